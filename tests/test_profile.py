"""The message kinds of §3-§4: classification and the fields each request must carry."""

from __future__ import annotations

import pytest

from cardcodec.profile import REQUESTS, Kind, classify, request_rule


@pytest.mark.parametrize(
    ("mti", "processing", "data", "kind"),
    [
        ("0800", None, "00000001003", Kind.SIGN_ON),
        ("0800", None, "00000001006", Kind.SIGN_ON),
        ("0820", None, "00000001002", Kind.SIGN_OFF),
        ("0820", None, "00000001301", Kind.ECHO),
        ("0200", "310000", "01000001000200", Kind.BALANCE),
        ("0200", "000000", "22000001000200", Kind.REDEMPTION),
        ("0200", "200000", "23000001000200", Kind.VOID),
        ("0220", "200000", "25000001000200", Kind.REFUND),
        ("0400", "000000", "22000001000200", Kind.REVERSAL),
        ("0400", "200000", "23000001000200", Kind.REVERSAL),
        ("0500", None, "00000001201", Kind.SETTLEMENT),
        ("0320", None, "00000001201", Kind.UPLOAD),
        ("0320", None, "00000001207", Kind.UPLOAD_END),
        ("0320", None, "00000001202", Kind.UPLOAD_END),
    ],
)
def test_valid_combinations_classify(
    mti: str, processing: str | None, data: str, kind: Kind
) -> None:
    """Each combination §3 lists names its kind."""
    assert classify(mti, processing, data) is kind


@pytest.mark.parametrize(
    ("mti", "processing", "data"),
    [
        ("0200", "000000", "23000001000200"),  # redemption code with void type
        ("0220", "000000", "22000001000200"),  # refund MTI with redemption code
        ("0400", "310000", "01000001000200"),  # balance inquiries are not reversed
        ("0400", "200000", "25000001000200"),  # refunds are not reversed
        ("0200", "000000", "22000001001200"),  # 60.3 must be 000 in financial messages
        ("0800", None, "00000001007"),
        ("0820", None, "00000001003"),
        ("0200", None, "22000001000200"),
        ("0200", "000000", None),
    ],
)
def test_other_combinations_are_not_supported(
    mti: str, processing: str | None, data: str | None
) -> None:
    """Anything else is `12` (no kind)."""
    assert classify(mti, processing, data) is None


def test_redemption_field_rules() -> None:
    """Track or card+expiry, never both; PIN group complete; nothing extra."""
    rule = REQUESTS[Kind.REDEMPTION].rule
    base = {3, 4, 11, 22, 25, 41, 42, 49, 53, 60, 64}
    assert rule.problem(base | {35}) is None
    assert rule.problem(base | {2, 14}) is None
    assert rule.problem(base | {35, 26, 52}) is None
    assert rule.problem(base | {35, 26, 62}) is None
    assert rule.problem(base) is not None
    assert rule.problem(base | {35, 2, 14}) is not None
    assert rule.problem(base | {2}) is not None
    assert rule.problem(base | {35, 26}) == "field 52 missing"
    assert rule.problem(base | {35, 52}) == "field 26 missing"
    assert rule.problem(base | {35, 26, 52, 62}) == "fields 26, 52, 62 do not go together"
    assert rule.problem(base | {35, 52, 62}) == "fields 52, 62 do not go together"
    assert rule.problem(base | {35, 37}) == "field 37 not allowed here"
    assert rule.problem((base - {4}) | {35}) == "field 4 missing"


def test_void_and_refund_carry_no_pin() -> None:
    """Voids and refunds list no PIN fields."""
    for kind in (Kind.VOID, Kind.REFUND):
        rule = REQUESTS[kind].rule
        base = {3, 4, 11, 22, 25, 35, 37, 41, 42, 49, 53, 60, 61, 64}
        assert rule.problem(base) is None
        assert rule.problem(base | {26, 52}) is not None


def test_reversal_excludes_track_and_pin() -> None:
    """A reversal carries no 26, 35, 52, 53, 62 or 37; 2 and 14 come together."""
    rule = REQUESTS[Kind.REVERSAL].rule
    base = {3, 4, 11, 22, 25, 39, 41, 42, 49, 60, 64}
    assert rule.problem(base) is None
    assert rule.problem(base | {2, 14}) is None
    for extra in (26, 35, 37, 52, 53, 62):
        assert rule.problem(base | {extra}) is not None
    assert rule.problem(base | {2}) is not None


def test_void_reversal_carries_61_and_redemption_reversal_does_not() -> None:
    """61 is required when the reversed original was a void, refused otherwise."""
    base = {3, 4, 11, 22, 25, 39, 41, 42, 49, 60, 64}
    assert request_rule(Kind.REVERSAL, "23").problem(base | {61}) is None
    assert request_rule(Kind.REVERSAL, "23").problem(base) == "field 61 missing"
    assert request_rule(Kind.REVERSAL, "22").problem(base | {61}) is not None
    assert request_rule(Kind.REDEMPTION, "22") is REQUESTS[Kind.REDEMPTION].rule

"""Card numbers: Luhn, issuer prefixes, masking and the reasons a number is refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cardcodec.cards import (
    card_number_problem,
    has_issuer_prefix,
    luhn_check_digit,
    luhn_valid,
    mask_card_data,
    mask_card_number,
)

PLAN_CARD = "6688001234567890124"
PREFIXES = ("668800", "668801")


@pytest.mark.parametrize(
    ("partial", "check_digit"),
    [
        ("7992739871", "3"),
        ("411111111111111", "1"),
        ("668800123456789012", "4"),
        ("0", "0"),
    ],
)
def test_luhn_check_digit_known_answers(partial: str, check_digit: str) -> None:
    """The check digit matches published Luhn examples and the vectors' card number."""
    assert luhn_check_digit(partial) == check_digit


@pytest.mark.parametrize("partial", ["", "12a4", "１２３", "12 3"])
def test_luhn_check_digit_refuses_non_digits(partial: str) -> None:
    """An empty or non-ASCII-digit part raises ValueError that does not repeat it."""
    with pytest.raises(ValueError, match="not all digits") as caught:
        luhn_check_digit(partial)
    assert not partial or partial not in str(caught.value)


@pytest.mark.parametrize("number", ["79927398713", "4111111111111111", PLAN_CARD])
def test_luhn_valid_accepts_correct_numbers(number: str) -> None:
    """Numbers that end in their correct check digit are valid."""
    assert luhn_valid(number)


@pytest.mark.parametrize(
    "number", ["79927398710", "4111111111111112", "6688001234567890125", "", "0", "12a4", "１８"]
)
def test_luhn_valid_rejects_wrong_or_malformed_numbers(number: str) -> None:
    """A wrong check digit, fewer than 2 digits or a non-ASCII-digit character is not valid."""
    assert not luhn_valid(number)


@given(st.text(alphabet="0123456789", min_size=1, max_size=30))
def test_appended_check_digit_is_always_valid(partial: str) -> None:
    """Appending luhn_check_digit to any digit string gives a Luhn-valid number."""
    assert luhn_valid(partial + luhn_check_digit(partial))


def _textbook_luhn_valid(number: str) -> bool:
    """Luhn as usually written: from the right, every second digit doubled, 9 taken off."""
    total = 0
    for position, char in enumerate(reversed(number)):
        value = int(char) * (2 if position % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


@given(st.text(alphabet="0123456789", min_size=2, max_size=30))
def test_luhn_valid_agrees_with_the_textbook_definition(number: str) -> None:
    assert luhn_valid(number) == _textbook_luhn_valid(number)


def test_luhn_one_wrong_digit_anywhere_is_caught() -> None:
    number = "6200001234567890" + luhn_check_digit("6200001234567890")
    for index in range(len(number)):
        for digit in "0123456789":
            if digit != number[index]:
                assert not luhn_valid(number[:index] + digit + number[index + 1 :])


def test_issuer_prefix_matches_start_only() -> None:
    """A prefix matches only at the start of the number, and an empty prefix never matches."""
    assert has_issuer_prefix(PLAN_CARD, PREFIXES)
    assert not has_issuer_prefix(PLAN_CARD, ("001234",))
    assert not has_issuer_prefix(PLAN_CARD, ("",))
    assert not has_issuer_prefix(PLAN_CARD, ())


@pytest.mark.parametrize(
    ("number", "masked"),
    [
        (PLAN_CARD, "668800*********0124"),
        ("4111111111111111", "411111******1111"),
        ("411111111111111", "***********1111"),
        ("41111111111", "*******1111"),
        ("4111111111", "**********"),
        ("1234", "****"),
        ("", ""),
    ],
)
def test_mask_card_number_by_length(number: str, masked: str) -> None:
    """16+ characters show first 6 and last 4, 11-15 only the last 4, 10 or fewer nothing."""
    assert mask_card_number(number) == masked


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (f"card {PLAN_CARD}.", "card 668800*********0124."),
        (f"{PLAN_CARD}D2812101123456789012", "668800*********0124" + "*" * 20),
        (f";{PLAN_CARD}=2812101?", ";668800*********0124********?"),
        ("rrn 000000000042, amount 5000000", "rrn 000000000042, amount 5000000"),
        ("DEADBEEF", "DEADBEEF"),
        # written in groups, by spaces or dashes
        ("tier 6688 0012 3456 7890 124", "tier 668800*********0124"),
        ("ref 6688-0012-3456-7890-124 x", "ref 668800*********0124 x"),
        ("on 2026-11-21 10:00, trace 000001", "on 2026-11-21 10:00, trace 000001"),
        # groups that are not a card's fours are left alone
        ("traces 000121 000122 000123 retried", "traces 000121 000122 000123 retried"),
        ("window 2026-11-01-2026-11-30", "window 2026-11-01-2026-11-30"),
        ("amounts 100 200 300 400 500", "amounts 100 200 300 400 500"),
    ],
)
def test_mask_card_data_masks_numbers_and_hides_what_a_track_adds(text: str, masked: str) -> None:
    """Runs of 13 or more digits, whole or in groups joined by single spaces or dashes, are
    masked as card numbers, and a track's separator and what follows it are hidden; shorter
    runs (an RRN, an amount, a date) stay as they are."""
    assert mask_card_data(text) == masked
    assert mask_card_data("rrn 000000000042", shortest=12) == "rrn ********0042"


@given(st.text(alphabet="0123456789", max_size=40))
def test_mask_never_reveals_more_than_ten_digits(number: str) -> None:
    """The mask keeps the length, shows at most 10 digits and always hides at least 6."""
    masked = mask_card_number(number)
    assert len(masked) == len(number)
    shown = sum(char != "*" for char in masked)
    assert shown <= 10
    assert len(number) - shown >= min(6, len(number))
    assert all(m in ("*", n) for m, n in zip(masked, number, strict=True))


def test_plan_card_has_no_problem() -> None:
    """A 19-digit Luhn-valid number with an issuer prefix is accepted."""
    assert card_number_problem(PLAN_CARD, PREFIXES) is None


@pytest.mark.parametrize(
    ("number", "reason"),
    [
        ("668800123456789012", "not 19 digits"),
        ("66880012345678901240", "not 19 digits"),
        ("668800123456789012D", "not 19 digits"),
        ("６688001234567890124", "not 19 digits"),
        ("6688001234567890125", "Luhn check digit wrong"),
        ("6677001234567890127", "issuer prefix unknown"),
    ],
)
def test_card_number_problem_reasons(number: str, reason: str) -> None:
    """Each refusal gives its short reason, and no reason contains the number."""
    problem = card_number_problem(number, PREFIXES)
    assert problem == reason
    assert number not in problem

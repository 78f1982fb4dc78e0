"""Card numbers of the plan (points-and-clearing.md §2): Luhn, issuer prefixes and masking.

The gateway checks a card number before it looks the card up, and masks it before anything
shows it. Both live here so that every layer checks and masks the same way, and so that the
reason for a rejected number never repeats the number itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

CARD_NUMBER_DIGITS = 19

# Masking shows at most the issuer part (first 6) and the last 4, and only for numbers long
# enough that 6 or more digits stay hidden; shorter inputs show less (see mask_card_number).
_MASK_FULL_FROM = 16
_MASK_LAST_ONLY_FROM = 11
_SHOWN_FIRST = 6
_SHOWN_LAST = 4


# A digit's value, and its Luhn value when doubled (2d, less 9 past 9), by its character.
_PLAIN = {str(digit): digit for digit in range(10)}
_DOUBLED = {str(digit): 2 * digit - 9 * (digit > 4) for digit in range(10)}


def _luhn_sum(digits: str, *, check_digit_present: bool) -> int:
    """Luhn sum, doubling every second digit counted from the right of the whole number.

    `digits` must be ASCII digits (the callers check). The digits kept and those doubled are
    two slices, each summed through a table: no Python step per digit."""
    backwards = digits[::-1]
    first_doubled = 1 if check_digit_present else 0  # the check digit itself is never doubled
    doubled = backwards[first_doubled::2]
    kept = backwards[1 - first_doubled :: 2]
    return sum(map(_PLAIN.__getitem__, kept)) + sum(map(_DOUBLED.__getitem__, doubled))


def _is_digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def luhn_check_digit(partial: str) -> str:
    """The Luhn check digit to append to `partial` (1 or more ASCII digits, else ValueError)."""
    if not _is_digits(partial):
        raise ValueError("card number part is empty or not all digits")
    return str((10 - _luhn_sum(partial, check_digit_present=False) % 10) % 10)


def luhn_valid(number: str) -> bool:
    """Whether `number` (at least 2 ASCII digits) ends with its correct Luhn check digit."""
    if len(number) < 2 or not _is_digits(number):
        return False
    return _luhn_sum(number, check_digit_present=True) % 10 == 0


def has_issuer_prefix(number: str, prefixes: Iterable[str]) -> bool:
    """Whether `number` starts with one of the configured prefixes (empty prefixes never match)."""
    return any(prefix and number.startswith(prefix) for prefix in prefixes)


def mask_card_number(number: str) -> str:
    """`number` with its hidden characters replaced by `*`, one for one (the length is kept).

    19 or 16 digits: first 6 and last 4 shown (`668800*********0124`). The rule by length:
    16 or more characters show the first 6 and the last 4; 11 to 15 show only the last 4;
    10 or fewer show nothing. So at least 6 characters are always hidden, never more than 10
    are shown, and a short (possibly truncated or mistyped) number reveals less, not more.
    """
    length = len(number)
    if length >= _MASK_FULL_FROM:
        first, last = _SHOWN_FIRST, _SHOWN_LAST
    elif length >= _MASK_LAST_ONLY_FROM:
        first, last = 0, _SHOWN_LAST
    else:
        return "*" * length
    return number[:first] + "*" * (length - first - last) + number[length - last :]


def mask_card_data(text: str, shortest: int = 13) -> str:
    """`text` with every run of `shortest` or more digits masked as a card number
    (`mask_card_number`), and what a track puts after a card number (its separator `=` or `D`,
    then expiry, service code and discretionary data) hidden, one `*` per character. A number
    written as cards print it, in groups of four joined by single spaces or dashes ("6688 0000
    0000 0000 014"), counts as one run; other groups (dates, lists of traces) are left alone."""
    text = _CARD_GROUPS_RE.sub(lambda match: _masked_groups(match, shortest), text)
    return _CARD_RUN_RE.sub(lambda match: _masked_run(match, shortest), text)


# Digits as a card prints them: three or more groups of four, then a last group of one to
# four, joined by single spaces or dashes; and an unbroken run, then what a track puts after.
_CARD_GROUPS_RE = re.compile(r"(?<![0-9])[0-9]{4}(?:[ -][0-9]{4}){2,}(?:[ -][0-9]{1,4})?(?![0-9])")
_CARD_RUN_RE = re.compile(r"(?<![0-9])([0-9]+)((?:[=D][0-9]*)?)")


def _masked_groups(match: re.Match[str], shortest: int) -> str:
    digits = match[0].replace(" ", "").replace("-", "")
    return mask_card_number(digits) if len(digits) >= shortest else match[0]


def _masked_run(match: re.Match[str], shortest: int) -> str:
    if len(match[1]) < shortest:
        return match[0]
    return mask_card_number(match[1]) + "*" * len(match[2])


# Key material as a config or scenario holds it: 16 or more hex characters with a letter among
# them, or more digits than any card number has (a key may happen to be all digits). A key may
# be written in groups ("FD32 139F ..." or "FD:32:13:..."): groups of two or more hex
# characters joined by single spaces, colons or dashes count together.
_HEX_GROUPS_RE = re.compile(
    r"(?<![0-9A-Fa-f])[0-9A-Fa-f]{2,}(?:[ :-][0-9A-Fa-f]{2,})*(?![0-9A-Fa-f])"
)
_SEPARATORS = str.maketrans("", "", " :-")


def _hidden_if_key(match: re.Match[str]) -> str:
    run = match[0]
    digits = run.translate(_SEPARATORS)
    if len(digits) >= 20 or (len(digits) >= 16 and not digits.isdigit()):
        return f"<{len(digits)} hex characters>"
    return run


def mask_quoted_value(text: str, shortest: int = 13) -> str:
    """A value an error message quotes: whatever looks like key material hidden whole (a
    terminal's TMK put under the wrong key, say, even written in groups), then card numbers
    masked (`mask_card_data`). A run hidden shows only how many hex characters it had."""
    return mask_card_data(_HEX_GROUPS_RE.sub(_hidden_if_key, text), shortest)


def card_number_problem(number: str, prefixes: Iterable[str]) -> str | None:
    """None for a plan card number, else a short reason that never contains the number.

    A plan card number is 19 ASCII digits, Luhn-valid, starting with a configured issuer prefix.
    """
    if len(number) != CARD_NUMBER_DIGITS or not _is_digits(number):
        return "not 19 digits"
    if not luhn_valid(number):
        return "Luhn check digit wrong"
    if not has_issuer_prefix(number, prefixes):
        return "issuer prefix unknown"
    return None

"""Hypothesis strategies for the codec: field values from the profile's table, whole messages
of every kind of §4 (requests and answers), and frames."""

from __future__ import annotations

import string

from hypothesis import strategies as st

from cardcodec.frame import Header, Tpdu
from cardcodec.message import FieldValue, Message
from cardcodec.profile import REQUESTS, RESPONSES, FieldRule, Kind
from cardcodec.spec import FIELDS, FieldDef, Format, Length
from cardcodec.subfields import MessageData

ALNUM = string.ascii_letters + string.digits
PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F))


def _size(row: FieldDef) -> st.SearchStrategy[int]:
    if row.length is Length.FIXED:
        return st.just(row.max_len)
    return st.integers(min_value=1, max_value=row.max_len)


def field_value(number: int) -> st.SearchStrategy[FieldValue]:
    """Any value the profile allows in that field."""
    row = FIELDS[number]
    if row.format is Format.BINARY:
        return _size(row).flatmap(lambda n: st.binary(min_size=n, max_size=n))
    alphabet = {
        Format.NUMERIC: string.digits,
        Format.NUMERIC_LEFT: string.digits,
        Format.TRACK: string.digits + "D",
        Format.ALPHANUMERIC: ALNUM,
        Format.PRINTABLE: PRINTABLE,
    }[row.format]
    return _size(row).flatmap(lambda n: st.text(alphabet, min_size=n, max_size=n))


def _field_set(rule: FieldRule) -> st.SearchStrategy[frozenset[int]]:
    one_of = st.sampled_from(rule.one_of) if rule.one_of else st.just(frozenset[int]())
    options = rule.optional_one_of
    groups = st.lists(st.sampled_from(options), max_size=1) if options else st.just([])
    return st.tuples(one_of, groups).map(
        lambda chosen: rule.required | chosen[0] | frozenset().union(*chosen[1])
    )


def message_data(kind: Kind) -> st.SearchStrategy[str]:
    """Field 60 as a request of that kind would send it."""
    profile = REQUESTS[kind]
    batch = st.text(string.digits, min_size=6, max_size=6)
    if profile.management_codes:
        code = st.sampled_from(sorted(profile.management_codes))
        return st.tuples(batch, code).map(
            lambda p: MessageData(profile.message_type or "00", p[0], p[1]).format()
        )
    message_type = profile.message_type or "22"
    return st.tuples(batch, st.booleans()).map(
        lambda p: MessageData(message_type, p[0], "000", "2", "0", p[1]).format()
    )


@st.composite
def envelopes(draw: st.DrawFn) -> tuple[Tpdu, Header]:
    hexdigits = st.text("0123456789ABCDEF", min_size=4, max_size=4)
    tpdu = Tpdu(draw(hexdigits), draw(hexdigits))
    digits = draw(st.text(string.digits, min_size=12, max_size=12))
    return tpdu, Header(digits[0:2], digits[2:4], digits[4], digits[5], digits[6:12])


@st.composite
def messages(draw: st.DrawFn, kind: Kind, response: bool = False) -> Message:
    """A message of that kind: its MTI, a field set its rule allows, values of the right form."""
    profile = REQUESTS[kind]
    rule = RESPONSES[kind] if response else profile.rule
    numbers = draw(_field_set(rule))
    fields: dict[int, FieldValue] = {n: draw(field_value(n)) for n in sorted(numbers)}
    if 60 in fields:
        fields[60] = draw(message_data(kind))
    if profile.processing_code is not None and 3 in fields:
        fields[3] = profile.processing_code
    tpdu, header = draw(envelopes())
    mti = f"{int(profile.mti) + 10:04d}" if response else profile.mti
    return Message(mti, fields, tpdu, header)


def any_message() -> st.SearchStrategy[Message]:
    return st.sampled_from(list(Kind)).flatmap(
        lambda kind: st.booleans().flatmap(lambda response: messages(kind, response))
    )

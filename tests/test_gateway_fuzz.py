"""Hostile input to the gateway's core: mutated valid requests never raise, never move points
unless they are valid MAC-correct requests, and every answer is a well-formed frame."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from gateway.ledger import operations, unit_of_work
from gateway.ledger.invariants import check_invariants
from gateway.ledger.models import Authorisation, AuthorisationKind
from tests.gateway_harness import DIAMOND, Harness, demo_config
from tests.spec_terminal import parse

DIAMOND_POINTS = 50000  # the demo config's lots of the card


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Harness, list[bytes]]:
    harness = Harness(demo_config(tmp_path_factory.mktemp("fuzz")))
    terminal = harness.signed_on()
    requests = []
    for amount in (100, 12800):
        fields = terminal.card_fields(DIAMOND, "2906")
        requests.append(terminal.financial("0200", "000000", "22", fields, amount_fen=amount))
    return harness, requests


@st.composite
def mutations(draw: st.DrawFn, requests: list[bytes]) -> bytes:
    payload = bytearray(draw(st.sampled_from(requests)))
    for _ in range(draw(st.integers(1, 3))):
        position = draw(st.integers(0, len(payload) - 1))
        action = draw(st.sampled_from(["flip", "insert", "delete"]))
        if action == "flip":
            payload[position] ^= draw(st.integers(1, 255))
        elif action == "insert":
            payload.insert(position, draw(st.integers(0, 255)))
        elif len(payload) > 1:
            del payload[position]
    return bytes(payload)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_requests_never_raise_and_never_approve(
    fuzzed: tuple[Harness, list[bytes]], data: st.DataObject
) -> None:
    """A mutated frame is answered with a decline, or the link is closed; nothing approves."""
    harness, requests = fuzzed
    payload = data.draw(mutations(requests))
    answer = harness.gateway.handle(payload).payload
    if answer is not None:
        _, fields, _, _ = parse(answer)
        untouched_body = payload[11:] in {request[11:] for request in requests}
        assert fields[39] != "00" or untouched_body


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=120))
def test_arbitrary_payloads_never_raise(fuzzed: tuple[Harness, list[bytes]], data: bytes) -> None:
    """Random bytes are answered or closed, never an exception."""
    harness, _ = fuzzed
    harness.gateway.handle(data)


def test_the_ledger_is_untouched_by_the_fuzz(fuzzed: tuple[Harness, list[bytes]]) -> None:
    """After the fuzz (the tests above, in the file's order, on the module's ledger) the
    books agree with themselves, and the only points that moved are those of the two valid
    requests (a mutation of the header alone leaves one valid), each taken at most once."""
    harness, _ = fuzzed
    with unit_of_work(harness.engine) as session:
        assert check_invariants(session) == []
        approved = session.execute(
            select(Authorisation.amount_fen, Authorisation.points).where(
                Authorisation.kind == AuthorisationKind.REDEMPTION,
                Authorisation.response_code.in_(("00", "10")),
            )
        ).all()
        amounts = [amount for amount, _ in approved]
        assert len(set(amounts)) == len(amounts) and set(amounts) <= {100, 12800}
        spent = sum(points for _, points in approved)
        held = operations.balances(session, DIAMOND, harness.clock.now()).ledger_points
        assert held == DIAMOND_POINTS - spent

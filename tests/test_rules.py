"""Choosing a merchant's discount rule (points-and-clearing.md §1)."""

from __future__ import annotations

from datetime import date, datetime, time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.clock import SHANGHAI, business_date
from gateway.rules import END_OF_DAY, TIERS, Rule, choose_rule

CUTOFF = time(23, 0)
SATURDAY = datetime(2026, 3, 7, 12, 0, tzinfo=SHANGHAI)
FRIDAY = datetime(2026, 3, 6, 12, 0, tzinfo=SHANGHAI)


def rule(rule_id: str = "r", discount_bp: int = 1000, **conditions: Any) -> Rule:
    """A rule with no conditions unless given."""
    fields: dict[str, Any] = {
        "tiers": None,
        "days": None,
        "hours": None,
        "valid_from": None,
        "valid_to": None,
    }
    fields.update(conditions)
    return Rule(id=rule_id, discount_bp=discount_bp, **fields)


def choose(
    rules: list[Rule],
    *,
    tier: str = "gold",
    local: datetime = SATURDAY,
    amount_fen: int = 10000,
) -> Rule | None:
    """choose_rule with the business date derived from the local instant and the cut-off."""
    return choose_rule(
        rules,
        tier=tier,
        local=local,
        business_date=business_date(local, CUTOFF),
        amount_fen=amount_fen,
    )


def at(hour: int, minute: int = 0, second: int = 0, us: int = 0) -> datetime:
    return SATURDAY.replace(hour=hour, minute=minute, second=second, microsecond=us)


def test_no_rules_gives_none() -> None:
    """A merchant without rules gives no discount."""
    assert choose([]) is None


def test_unconditional_rule_applies() -> None:
    """A rule without conditions applies to every swipe."""
    plain = rule()
    assert choose([plain]) is plain


@pytest.mark.parametrize("tier", TIERS)
def test_tier_rule_applies_only_to_its_tiers(tier: str) -> None:
    """A tier rule applies to the tiers it names and to no other."""
    top = rule(tiers=frozenset({"diamond", "gold"}))
    expected = top if tier in ("diamond", "gold") else None
    assert choose([top], tier=tier) is expected


def test_day_rule_uses_monday_as_zero() -> None:
    """days holds weekday numbers, 0 for Monday: {5, 6} is the weekend."""
    weekend = rule(days=frozenset({5, 6}))
    assert choose([weekend], local=SATURDAY) is weekend
    assert choose([weekend], local=FRIDAY) is None


def test_hours_start_is_included() -> None:
    """A time window applies from its first instant."""
    window = rule(hours=(time(10, 0), time(22, 0)))
    assert choose([window], local=at(10, 0)) is window
    assert choose([window], local=at(9, 59, 59, 999999)) is None


def test_hours_end_is_excluded() -> None:
    """A time window stops applying at its end."""
    window = rule(hours=(time(10, 0), time(22, 0)))
    assert choose([window], local=at(21, 59, 59, 999999)) is window
    assert choose([window], local=at(22, 0)) is None


def test_hours_to_midnight_take_in_the_last_minute() -> None:
    """A window ending "24:00" (END_OF_DAY) applies to the day's last instant, and not to
    the next day's first."""
    window = rule(hours=(time(18, 0), END_OF_DAY))
    assert choose([window], local=at(23, 59, 59, 999999)) is window
    assert choose([window], local=at(17, 59, 59)) is None
    assert choose([window], local=at(0, 0)) is None


def test_days_and_hours_read_the_local_clock_not_the_business_date() -> None:
    """Friday 23:30 has a Saturday business date but is still Friday for a weekend rule."""
    weekend = rule(days=frozenset({5, 6}))
    late_friday = FRIDAY.replace(hour=23, minute=30)
    assert business_date(late_friday, CUTOFF) == date(2026, 3, 7)
    assert choose([weekend], local=late_friday) is None


def test_days_read_the_local_date_after_midnight() -> None:
    """Saturday 00:30 local is Saturday for a weekend rule."""
    weekend = rule(days=frozenset({5, 6}))
    assert choose([weekend], local=at(0, 30)) is weekend


def test_valid_to_reads_the_business_date_after_the_cutoff() -> None:
    """31 Dec 23:30 is business date 1 Jan, past a rule valid to 31 Dec."""
    year_2026 = rule(valid_from=date(2026, 1, 1), valid_to=date(2026, 12, 31))
    before_cutoff = datetime(2026, 12, 31, 22, 59, tzinfo=SHANGHAI)
    after_cutoff = datetime(2026, 12, 31, 23, 30, tzinfo=SHANGHAI)
    assert choose([year_2026], local=before_cutoff) is year_2026
    assert choose([year_2026], local=after_cutoff) is None


def test_valid_from_reads_the_business_date_after_the_cutoff() -> None:
    """A rule valid from 1 Jan already applies at 31 Dec 23:00 local (business date 1 Jan)."""
    year_2027 = rule(valid_from=date(2027, 1, 1))
    assert choose([year_2027], local=datetime(2026, 12, 31, 22, 59, tzinfo=SHANGHAI)) is None
    assert choose([year_2027], local=datetime(2026, 12, 31, 23, 0, tzinfo=SHANGHAI)) is year_2027


def test_validity_dates_are_inclusive() -> None:
    """A rule applies on its valid_from and valid_to dates themselves."""
    one_day = rule(valid_from=date(2026, 3, 7), valid_to=date(2026, 3, 7))
    assert choose([one_day], local=SATURDAY) is one_day


def test_min_amount_is_inclusive() -> None:
    """A minimum of 10000 fen applies at 10000 and not at 9999."""
    big = rule(min_amount_fen=10000)
    assert choose([big], amount_fen=10000) is big
    assert choose([big], amount_fen=9999) is None


def test_all_conditions_must_hold() -> None:
    """One failing condition is enough to skip a rule."""
    strict = rule(
        tiers=frozenset({"diamond"}),
        days=frozenset({5, 6}),
        hours=(time(10, 0), time(22, 0)),
        min_amount_fen=100,
    )
    assert choose([strict], tier="diamond") is strict
    assert choose([strict], tier="gold") is None
    assert choose([strict], tier="diamond", local=FRIDAY) is None
    assert choose([strict], tier="diamond", local=at(22, 0)) is None
    assert choose([strict], tier="diamond", amount_fen=99) is None


def test_largest_discount_wins() -> None:
    """Of the rules that apply, the one with the largest discount wins."""
    small, large = rule("a", 500), rule("b", 1500)
    assert choose([small, large]) is large


def test_largest_discount_only_among_applicable_rules() -> None:
    """A larger discount that does not apply loses to a smaller one that does."""
    small, diamond_only = rule("a", 500), rule("b", 1500, tiers=frozenset({"diamond"}))
    assert choose([small, diamond_only], tier="gold") is small


def test_tie_goes_to_the_id_that_sorts_first() -> None:
    """Equal discounts: the rule whose id sorts first wins, whatever the order given."""
    first, second = rule("alpha", 1000), rule("beta", 1000)
    assert choose([second, first]) is first
    assert choose([first, second]) is first


@given(
    st.lists(
        st.builds(
            rule,
            st.text(alphabet="abcdef", min_size=1, max_size=4),
            st.integers(min_value=0, max_value=9999),
        ),
        max_size=8,
        unique_by=lambda r: r.id,
    ),
    st.randoms(use_true_random=False),
)
def test_choice_does_not_depend_on_the_order_of_rules(rules: list[Rule], rnd: Any) -> None:
    """The chosen rule is the same for any order of the merchant's rules."""
    shuffled = list(rules)
    rnd.shuffle(shuffled)
    assert choose(rules) == choose(shuffled)
    if rules:
        chosen = choose(rules)
        assert chosen is not None
        assert chosen.discount_bp == max(r.discount_bp for r in rules)


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"discount_bp": 10000}, "discount_bp"),
        ({"discount_bp": -1}, "discount_bp"),
        ({"hours": (time(22, 0), time(10, 0))}, "hours"),
        ({"hours": (time(10, 0), time(10, 0))}, "hours"),
        ({"valid_from": date(2026, 2, 1), "valid_to": date(2026, 1, 31)}, "valid_from"),
        ({"min_amount_fen": -1}, "min_amount_fen"),
        ({"days": frozenset({7})}, "days"),
    ],
)
def test_rule_refuses_impossible_values(fields: dict[str, Any], problem: str) -> None:
    """A Rule built with impossible values is refused naming the field."""
    with pytest.raises(ValueError, match=problem):
        rule(**fields)

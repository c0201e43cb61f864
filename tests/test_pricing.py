"""Exact prices (contract §4, §9): the accepted forms, the refused ones, ``charged(x) =
ceil(x * price)`` with no floating point anywhere, and how a price is written back."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.pricing import charged, format_price, parse_price, parse_share

MAX = 2**63 - 1


@pytest.mark.parametrize(
    ("text", "price"),
    [("0", Fraction(0)), ("3", Fraction(3)), ("0.01", Fraction(1, 100)), ("2.50", Fraction(5, 2)),
     ("1/3", Fraction(1, 3)), ("7/7", Fraction(1)), ("2/4", Fraction(1, 2)), ("0/5", Fraction(0)),
     ("007", Fraction(7)), ("0.000000000000000001", Fraction(1, 10**18)),
     ("999999999999999999", Fraction(10**18 - 1)),
     ("1/999999999999999999", Fraction(1, 10**18 - 1))],
)  # fmt: skip
def test_a_price_is_a_decimal_or_a_fraction_read_exactly(text: str, price: Fraction) -> None:
    assert parse_price(text) == price
    assert type(parse_price(text)) is Fraction


@pytest.mark.parametrize(
    "text",
    ["", " 1", "1 ", "1\n", "-1", "+1", "1e3", "1E-2", ".5", "5.", "0.1.2", "1/0", "1/-3", "-1/3",
     "1/3/4", "1.5/2", "1/", "/3", "nan", "inf", "0x10", "1_000", "\u00bd", "\uff13", "\u0663",
     "1/\uff13", "1234567890123456789", "0.1234567890123456789"],
)  # fmt: skip
def test_anything_else_is_refused_as_a_price(text: str) -> None:
    """Including other scripts' digits (fullwidth, Arabic-Indic), which int() would take."""
    with pytest.raises(ValueError, match="price"):
        parse_price(text)


@pytest.mark.parametrize("value", [0.01, 1, Fraction(1, 3), None, b"1"])
def test_a_price_must_be_a_string_not_a_number(value: object) -> None:
    with pytest.raises(ValueError, match="string"):
        parse_price(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "share"),
    [("0%", Fraction(0)), ("20%", Fraction(1, 5)), ("5%", Fraction(1, 20)), ("100%", Fraction(1)),
     ("12.5%", Fraction(1, 8)), ("0.1%", Fraction(1, 1000)),
     ("33.333333%", Fraction(33333333, 10**8))],
)  # fmt: skip
def test_a_share_is_a_percentage_read_exactly(text: str, share: Fraction) -> None:
    assert parse_share(text) == share


@pytest.mark.parametrize(
    "text",
    [
        "20",
        "0.2",
        "20 %",
        " 20%",
        "-5%",
        "1e1%",
        "%",
        "1000%",
        "20%%",
        "\uff12\uff10%",
        "1.1234567%",
    ],
)
def test_anything_else_is_refused_as_a_share(text: str) -> None:
    with pytest.raises(ValueError, match="percentage"):
        parse_share(text)


def test_a_share_above_100_percent_is_refused_naming_the_limit() -> None:
    with pytest.raises(ValueError, match="100%"):
        parse_share("100.5%")
    with pytest.raises(ValueError, match="percentage"):
        parse_share(20)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("units", "price", "tokens"),
    [
        (0, "0.01", 0), (1, "0.01", 1), (99, "0.01", 1), (100, "0.01", 1), (101, "0.01", 2),
        (200, "0.01", 2), (1, "1/3", 1), (2, "1/3", 1), (3, "1/3", 1), (4, "1/3", 2),
        (6, "1/3", 2), (7, "1/3", 3), (1, "2/3", 1), (2, "2/3", 2), (3, "2/3", 2),
        (5, "0", 0), (MAX, "0", 0), (7, "3", 21), (1, "1/999999999999999999", 1),
        (MAX, "1", MAX), (MAX, "0.01", 92233720368547759), (MAX, "1/3", 3074457345618258603),
        (MAX, "2/3", 6148914691236517205), (MAX, "0.000000000000000001", 10),
        (MAX, "999999999999999999", MAX * (10**18 - 1)),
        (2**63 - 2, "1/2", 2**62 - 1), (2**63 - 3, "1/3", 3074457345618258602),
    ],
)  # fmt: skip
def test_charged_is_the_exact_ceiling_of_units_times_price(
    units: int, price: str, tokens: int
) -> None:
    assert charged(units, parse_price(price)) == tokens


def test_charged_uses_no_float_a_float_would_be_wrong_near_2_to_the_63() -> None:
    """At this size a float product is off by hundreds; ``charged`` is exact."""
    price = Fraction(1, 3)
    exact = charged(MAX, price)
    assert exact == (MAX + 2) // 3
    assert math.ceil(MAX * float(price)) != exact


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, MAX),
    st.integers(0, 10**18),
    st.integers(1, 10**18),
)
def test_charged_is_the_smallest_whole_number_covering_the_exact_cost(
    units: int, numerator: int, denominator: int
) -> None:
    price = Fraction(numerator, denominator)
    tokens = charged(units, price)
    assert type(tokens) is int
    assert tokens >= units * price > tokens - 1


@settings(max_examples=200, deadline=None)
@given(st.integers(0, MAX), st.integers(0, MAX), st.integers(0, 10**6), st.integers(1, 10**6))
def test_charging_in_steps_adds_up_to_charging_at_once(
    a: int, b: int, numerator: int, denominator: int
) -> None:
    """Rounding never drifts: (charged(hi) - charged(mid)) + charged(mid) == charged(hi)."""
    price = Fraction(numerator, denominator)
    low, high = sorted((a, b))
    assert charged(low, price) <= charged(high, price)
    assert (charged(high, price) - charged(low, price)) + charged(low, price) == charged(
        high, price
    )


@pytest.mark.parametrize(
    ("price", "text"),
    [(Fraction(0), "0"), (Fraction(5), "5"), (Fraction(1, 100), "0.01"), (Fraction(5, 2), "2.5"),
     (Fraction(1, 8), "0.125"), (Fraction(1, 3), "1/3"), (Fraction(2, 6), "1/3"),
     (Fraction(7, 12), "7/12"), (Fraction(1, 10**18), "0.000000000000000001"),
     (Fraction(123456789, 1000), "123456.789")],
)  # fmt: skip
def test_a_price_is_written_as_a_decimal_when_it_is_one_else_as_a_fraction(
    price: Fraction, text: str
) -> None:
    assert format_price(price) == text


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**18 - 1), st.integers(1, 10**9))
def test_a_formatted_price_parses_back_to_itself(numerator: int, denominator: int) -> None:
    price = Fraction(numerator, denominator)
    assert parse_price(format_price(price)) == price


def test_a_price_with_more_than_18_decimals_is_written_as_a_fraction_that_parses() -> None:
    price = parse_price("1/1048576")  # 0.00000095367431640625: 20 decimals
    assert format_price(price) == "1/1048576"
    assert parse_price(format_price(price)) == price

"""Exact prices and the charging function ``charged(x) = ceil(x * price)`` (contract §4).

No floating point anywhere: prices are :class:`fractions.Fraction`, parsed from decimal
strings (``"0.01"``) or fractions (``"1/3"``).
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Final

# [0-9], not \d: \d also matches other scripts' digits (fullwidth, Arabic-Indic), which
# int() and Fraction() accept.
_DECIMAL: Final = re.compile(r"[0-9]{1,18}(\.[0-9]{1,18})?\Z")
_FRACTION: Final = re.compile(r"[0-9]{1,18}/[0-9]{1,18}\Z")
_PERCENT: Final = re.compile(r"[0-9]{1,3}(\.[0-9]{1,6})?%\Z")


def parse_price(text: str) -> Fraction:
    """Parse a non-negative price: ``"3"``, ``"0.01"`` or ``"1/3"``.

    Raises ValueError for anything else (floats as numbers, exponents, negatives, ``x/0``).
    """
    if not isinstance(text, str):
        raise ValueError(f"a price is a string such as '0.01' or '1/3', not {text!r}")
    if _DECIMAL.match(text):
        return Fraction(text)
    if _FRACTION.match(text):
        numerator, denominator = text.split("/")
        if int(denominator) == 0:
            raise ValueError(f"price {text!r} divides by zero")
        return Fraction(int(numerator), int(denominator))
    raise ValueError(f"price {text!r} is not a decimal ('0.01') or a fraction ('1/3')")


def parse_share(text: str) -> Fraction:
    """Parse a percentage ``"20%"`` into a share in [0, 1]; raises ValueError otherwise."""
    if not isinstance(text, str) or not _PERCENT.match(text):
        raise ValueError(f"{text!r} is not a percentage such as '20%'")
    share = Fraction(text[:-1]) / 100
    if share > 1:
        raise ValueError(f"{text!r} is more than 100%")
    return share


def format_price(price: Fraction) -> str:
    """The exact string for a price, in a form :func:`parse_price` reads back: a decimal
    (``"0.01"``) when it is one with at most 18 digits after the point, else a fraction
    (``"1/3"``, and ``"1/1048576"`` rather than 20 decimals)."""
    for scale in range(19):
        scaled = price * 10**scale
        if scaled.denominator == 1:
            digits = str(scaled.numerator).rjust(scale + 1, "0")
            return digits if scale == 0 else f"{digits[:-scale]}.{digits[-scale:]}"
    return f"{price.numerator}/{price.denominator}"


def charged(units: int, price: Fraction) -> int:
    """Tokens owed for a cumulative count: ``ceil(units * price)``, exactly."""
    return -((-units * price.numerator) // price.denominator)

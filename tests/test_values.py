"""The fast paths that replace standard ones, checked against them: ``rfc3339`` against
``datetime.isoformat``."""

from __future__ import annotations

import datetime as dt

from hypothesis import given
from hypothesis import strategies as st

from gateway.views import rfc3339

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@given(st.integers(-(10**12), 250_000_000_000_000))
def test_rfc3339_is_isoformat_to_the_millisecond(ms: int) -> None:
    moment = _EPOCH + dt.timedelta(milliseconds=ms)
    expected = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert rfc3339(ms) == expected

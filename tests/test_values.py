"""The fast paths that replace standard ones, checked against them: ``evolve`` against
``dataclasses.replace``, ``rfc3339`` against ``datetime.isoformat``."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.economics import Pool
from gateway.metering import Device
from gateway.values import evolve
from gateway.views import rfc3339

DEVICE = Device("dev-1", b"k" * 32, "acme", "dev-1", 5, 1, 2, highs=((1, "api", 5),))
DEVICE_CHANGES = st.fixed_dictionaries(
    {},
    optional={
        "used": st.integers(0, 2**63),
        "updated_ms": st.integers(0, 2**50),
        "last_report_ms": st.none() | st.integers(0, 2**50),
        "revoked": st.booleans(),
        "highs": st.lists(st.tuples(st.integers(0, 9), st.text(max_size=3), st.integers())).map(
            tuple
        ),
        "cap": st.none() | st.integers(0, 10**6),
    },
)


@given(DEVICE_CHANGES)
def test_evolve_is_dataclasses_replace(changes: dict[str, Any]) -> None:
    evolved = evolve(DEVICE, **changes)
    assert evolved == dataclasses.replace(DEVICE, **changes)
    assert type(evolved) is Device
    assert DEVICE.used == 5  # the original is untouched


def test_evolve_works_for_every_record_shape() -> None:
    pool = Pool("p", "acme")
    assert evolve(pool, used=7) == dataclasses.replace(pool, used=7)
    assert evolve(pool) == pool

    @dataclasses.dataclass(frozen=True, slots=True)
    class One:
        only: int

    assert evolve(One(1), only=2) == One(2)
    assert evolve(One(1)) == One(1)
    with pytest.raises(KeyError):
        evolve(One(1), other=2)


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@given(st.integers(-(10**12), 250_000_000_000_000))
def test_rfc3339_is_isoformat_to_the_millisecond(ms: int) -> None:
    moment = _EPOCH + dt.timedelta(milliseconds=ms)
    expected = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert rfc3339(ms) == expected

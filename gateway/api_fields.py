"""Field types and parsing shared by the admin API's routes (:mod:`gateway.api`,
:mod:`gateway.api_accounts`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator, Field

from gateway.errors import BadRequest
from gateway.views import parse_time

TIME = (
    r"^(\d{1,15}|\d{4}-\d{2}-\d{2}([Tt ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?([Zz]|[+-]\d{2}:\d{2})?)?)$"
)
ID = r"^[A-Za-z0-9_.\-]{1,64}$"
LAST_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z: the last RFC 3339 instant
DeviceId = Annotated[str, Field(pattern=ID)]
AccountId = Annotated[str, Field(pattern=ID)]


def whole_number(value: object) -> object:
    """JSON Schema counts 10.0 as an integer: accept it, but never a bool or a string."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


WholeNumber = BeforeValidator(whole_number)


def time_ms(name: str, text: str) -> int:
    """A time parameter in ms, from 1970 to the end of year 9999; raises BadRequest."""
    try:
        ms = parse_time(text)
    except (ValueError, OverflowError):
        ms = -1
    if not 0 <= ms <= LAST_MS:
        raise BadRequest(f"{name}: want RFC 3339, a date or ms since the epoch (1970 to 9999)")
    return ms

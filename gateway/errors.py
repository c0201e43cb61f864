"""Tokenwell's one error tree, and the reason codes for rejected input.

Two different things go wrong, and they are kept apart (after httpx ``_exceptions.py``):

* **A device sent junk.** That is an ordinary outcome, not an exception: the wire decoder
  and the charging core return a :class:`Rejection` value with a :class:`Reason` code,
  which the gateway counts (``/metrics``) and publishes as a ``rejected`` event.
  :class:`InvalidMessage` exists only to carry a rejection out of deep parsing code or out
  of a value object's constructor; it never escapes the wire module's public decoders.

* **Something is wrong around the gateway**, raised as exceptions::

    TokenwellError
    ├── InvalidMessage        a value object built from bad fields (carries a Rejection)
    ├── ConfigError           bad configuration: stops the gateway at start-up, names the key
    ├── AdminError            the admin API's caller asked for something impossible (4xx)
    │   ├── NotFound          404: no such device
    │   ├── Conflict          409: already exists, revoked, idempotency key reused
    │   └── BadRequest        422: a value out of range
    ├── LedgerError           the ledger cannot be opened or written (disk, lock, corruption)
    │   └── WriterLost        its writer process ended during a transaction (committed or not)
    ├── BrokerError           the broker is unreachable or refused us
    └── ApiUnavailable        the CLI cannot reach the admin web service

Third-party exceptions (sqlite3, paho, httpx) are translated into these once, in the
adapter that calls them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Reason(StrEnum):
    """Why a usage report was rejected. Values are the public reason codes (contract §4)."""

    OVERSIZED = "oversized"  # envelope larger than 4096 bytes, rejected unread
    MALFORMED = "malformed"  # not msgpack, trailing bytes, bad UTF-8, ext types, duplicate keys
    BAD_ENVELOPE = "bad_envelope"  # not a map of exactly m (bin) and s (64-byte bin)
    BAD_BODY = "bad_body"  # the body is not a msgpack map
    MISSING_FIELD = "missing_field"  # a required body key is absent
    WRONG_TYPE = "wrong_type"  # a body value has the wrong msgpack type
    UNSUPPORTED_VERSION = "unsupported_version"  # v is not a version this gateway speaks
    BAD_DEVICE_ID = "bad_device_id"  # d (or the topic's id) is not 1-64 of A-Za-z0-9_.-
    BAD_METER = "bad_meter"  # a meter name is not 1-32 of a-z0-9_
    OUT_OF_RANGE = "out_of_range"  # an int outside 0..2**63-1, >64 meters, used past 2**63-1
    DEVICE_MISMATCH = "device_mismatch"  # d differs from the topic's {id}
    UNKNOWN_DEVICE = "unknown_device"  # no device provisioned under that id
    REVOKED_DEVICE = "revoked_device"  # the device was revoked
    BAD_SIGNATURE = "bad_signature"  # the signature is not the device key's over the body


@dataclass(frozen=True, slots=True)
class Rejection:
    """A report the gateway refused: debits nothing, is counted and published."""

    reason: Reason
    detail: str = ""


class TokenwellError(Exception):
    """Root of every exception Tokenwell raises on purpose."""


class InvalidMessage(TokenwellError):
    """A message value object was built from out-of-range fields."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.rejection = Rejection(reason, detail)


class ConfigError(TokenwellError):
    """Bad configuration; the message names the offending key."""


class AdminError(TokenwellError):
    """The admin API caller asked for something that cannot be done; nothing was applied."""

    status = 400
    code = "bad_request"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(AdminError):
    status = 404
    code = "not_found"


class Conflict(AdminError):
    status = 409
    code = "conflict"


class BadRequest(AdminError):
    status = 422
    code = "invalid"


class LedgerError(TokenwellError):
    """The ledger cannot be opened, read or written."""


class WriterLost(LedgerError):
    """The ledger's writer process (gateway.writer) ended while a transaction was with it:
    whether that transaction committed is unknown until the ledger is read."""


class BrokerError(TokenwellError):
    """The MQTT broker cannot be reached or refused the connection."""


class ApiUnavailable(TokenwellError):
    """The CLI could not reach the admin web service."""


def first_leaf(error: BaseException) -> BaseException:
    """The first exception inside (nested) exception groups, as raised out of a TaskGroup.

    Re-raises it unless it is one of ours or an OSError: anything else is a bug and keeps
    its traceback.
    """
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    if not isinstance(error, TokenwellError | OSError):
        raise error
    return error

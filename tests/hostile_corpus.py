"""A corpus of hostile and broken usage reports, each with the reason it must be rejected for.

Every entry is ``(name, topic_device_id, payload, reason)``: published on the usage topic of
``topic_device_id``, it must be rejected with ``reason`` and debit nothing. The corpus is
built against a victim device ``VICTIM`` (provisioned), a revoked device ``REVOKED`` and
the victim's real key, so signatures are genuine wherever the test is about something else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.errors import Reason
from gateway.wire import USAGE_DOMAIN, UsageReport, encode_envelope, sign_usage, signed_bytes

VICTIM = "victim-01"
REVOKED = "revoked-01"
T = 1_795_000_000_000

Entry = tuple[str, str, bytes, Reason]


def _pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def _signed(key: Ed25519PrivateKey, body: bytes) -> bytes:
    return encode_envelope(body, key.sign(signed_bytes(USAGE_DOMAIN, body)))


def _body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"v": 1, "d": VICTIM, "b": 1, "n": 1, "t": T, "c": {"api_calls": 100}}
    for key, value in overrides.items():
        if value is _DROP:
            body.pop(key)
        else:
            body[key] = value
    return body


_DROP = object()


def build(
    victim: Ed25519PrivateKey, revoked: Ed25519PrivateKey, stranger: Ed25519PrivateKey
) -> list[Entry]:
    """The corpus: more than 40 distinct bad reports."""
    good = sign_usage(UsageReport(VICTIM, 1, 1, T, {"api_calls": 100}), victim)
    signed: Callable[..., bytes] = lambda **kw: _signed(victim, _pack(_body(**kw)))  # noqa: E731
    flipped = bytearray(good)
    flipped[-5] ^= 0x40
    body_flip = bytearray(good)
    body_flip[10] ^= 0x01
    entries: list[Entry] = [
        ("empty payload", VICTIM, b"", Reason.MALFORMED),
        ("truncated envelope", VICTIM, good[:-1], Reason.MALFORMED),
        ("truncated to half", VICTIM, good[: len(good) // 2], Reason.MALFORMED),
        ("trailing garbage", VICTIM, good + b"\x00", Reason.MALFORMED),
        ("plain text", VICTIM, b"api_calls=100", Reason.MALFORMED),
        ("json instead of msgpack", VICTIM, b'{"m": "", "s": ""}', Reason.MALFORMED),
        ("signature bit flipped", VICTIM, bytes(flipped), Reason.BAD_SIGNATURE),
        ("body bit flipped", VICTIM, bytes(body_flip), Reason.BAD_SIGNATURE),
        ("oversized envelope", VICTIM, _pack({"m": b"\x00" * 5000, "s": b"\x00" * 64}), Reason.OVERSIZED),
        ("envelope is a list", VICTIM, _pack([b"m", b"s"]), Reason.BAD_ENVELOPE),
        ("envelope is an int", VICTIM, _pack(7), Reason.BAD_ENVELOPE),
        ("envelope missing s", VICTIM, _pack({"m": b"x"}), Reason.BAD_ENVELOPE),
        ("envelope extra key", VICTIM, _pack({"m": b"x", "s": b"\x00" * 64, "x": 1}), Reason.BAD_ENVELOPE),
        ("m is str not bin", VICTIM, _pack({"m": "body", "s": b"\x00" * 64}), Reason.BAD_ENVELOPE),
        ("s is 63 bytes", VICTIM, _pack({"m": b"x", "s": b"\x00" * 63}), Reason.BAD_ENVELOPE),
        ("s is 65 bytes", VICTIM, _pack({"m": b"x", "s": b"\x00" * 65}), Reason.BAD_ENVELOPE),
        ("msgpack extension type", VICTIM, b"\x82\xa1m\xc7\x01\x05a\xa1s\xc4\x40" + b"\x00" * 64, Reason.MALFORMED),
        ("deeply nested", VICTIM, b"\x91" * 3000 + b"\x00", Reason.MALFORMED),
        ("invalid utf-8 key", VICTIM, b"\x82\xa1\xff\xc4\x01x\xa1s\xc4\x40" + b"\x00" * 64, Reason.MALFORMED),
        ("body not msgpack", VICTIM, _signed(victim, b"\xc1"), Reason.MALFORMED),
        ("body is a list", VICTIM, _signed(victim, _pack([1, 2, 3])), Reason.BAD_BODY),
        ("body missing v", VICTIM, signed(v=_DROP), Reason.MISSING_FIELD),
        ("body missing c", VICTIM, signed(c=_DROP), Reason.MISSING_FIELD),
        ("body missing t", VICTIM, signed(t=_DROP), Reason.MISSING_FIELD),
        ("v is a string", VICTIM, signed(v="1"), Reason.WRONG_TYPE),
        ("v is 2", VICTIM, signed(v=2), Reason.UNSUPPORTED_VERSION),
        ("v is 0", VICTIM, signed(v=0), Reason.UNSUPPORTED_VERSION),
        ("b is a float", VICTIM, signed(b=1.0), Reason.WRONG_TYPE),
        ("n is a bool", VICTIM, signed(n=True), Reason.WRONG_TYPE),
        ("t is nil", VICTIM, signed(t=None), Reason.WRONG_TYPE),
        ("c is a list", VICTIM, signed(c=[100]), Reason.WRONG_TYPE),
        ("counter is a float", VICTIM, signed(c={"api_calls": 1.5}), Reason.WRONG_TYPE),
        ("counter is a string", VICTIM, signed(c={"api_calls": "100"}), Reason.WRONG_TYPE),
        ("negative counter", VICTIM, signed(c={"api_calls": -1}), Reason.OUT_OF_RANGE),
        ("counter 2**63", VICTIM, signed(c={"api_calls": 2**63}), Reason.OUT_OF_RANGE),
        ("counter 2**64-1", VICTIM, signed(c={"api_calls": 2**64 - 1}), Reason.OUT_OF_RANGE),
        ("negative boot epoch", VICTIM, signed(b=-1), Reason.OUT_OF_RANGE),
        ("huge report number", VICTIM, signed(n=2**64 - 1), Reason.OUT_OF_RANGE),
        ("meter name upper case", VICTIM, signed(c={"API": 1}), Reason.BAD_METER),
        ("meter name empty", VICTIM, signed(c={"": 1}), Reason.BAD_METER),
        ("meter name 33 chars", VICTIM, signed(c={"a" * 33: 1}), Reason.BAD_METER),
        ("too many meters", VICTIM, signed(c={f"m{i}": 1 for i in range(65)}), Reason.OUT_OF_RANGE),
        ("d names another device", VICTIM, signed(d="someone-else"), Reason.DEVICE_MISMATCH),
        ("d is not a valid id", VICTIM, signed(d="bad id"), Reason.BAD_DEVICE_ID),
        ("another device's valid report", VICTIM,
         sign_usage(UsageReport(REVOKED, 1, 1, T, {"api_calls": 5}), revoked), Reason.BAD_SIGNATURE),
        ("report signed by a stranger", VICTIM,
         sign_usage(UsageReport(VICTIM, 1, 1, T, {"api_calls": 5}), stranger), Reason.BAD_SIGNATURE),
        ("control domain signature", VICTIM,
         encode_envelope(_pack(_body()), victim.sign(b"tokens/v1/control\x00" + _pack(_body()))),
         Reason.BAD_SIGNATURE),
        ("unknown device", "nobody-01",
         sign_usage(UsageReport("nobody-01", 1, 1, T, {"api_calls": 5}), stranger), Reason.UNKNOWN_DEVICE),
        ("revoked device's valid report", REVOKED,
         sign_usage(UsageReport(REVOKED, 1, 1, T, {"api_calls": 5}), revoked), Reason.REVOKED_DEVICE),
        ("topic id too long", "x" * 65, good, Reason.BAD_DEVICE_ID),
        ("topic id with a space", "bad id", good, Reason.BAD_DEVICE_ID),
        ("topic id with unicode", "dévice", good, Reason.BAD_DEVICE_ID),
    ]  # fmt: skip
    return entries

"""The wire format (contract §3-5): round trips, canonical bytes, what a signature covers,
value objects that are valid once built, every rejection reason, and the published test
vectors (docs/test-vectors.json) reproduced byte for byte."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import InvalidMessage, Reason, Rejection
from gateway.ingest import Registry, Rejected, verify
from gateway.metering import Device
from gateway.wire import (
    CONTROL_DOMAIN,
    MAX_ENVELOPE_BYTES,
    USAGE_DOMAIN,
    ControlMessage,
    Envelope,
    UsageReport,
    decode_control,
    decode_control_body,
    decode_envelope,
    decode_usage,
    decode_usage_body,
    encode_control_body,
    encode_envelope,
    encode_usage_body,
    is_device_id,
    is_meter_name,
    public_key_from_hex,
    public_key_hex,
    sign_control,
    sign_usage,
    signed_bytes,
)

DEVICE_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
GATEWAY_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
DEVICE_PUB = DEVICE_KEY.public_key()
GATEWAY_PUB = GATEWAY_KEY.public_key()
T = 1_795_000_000_000
REPORT = UsageReport("dev-1", 1, 1, T, {"api_calls": 42})
BASE: dict[str, Any] = {"v": 1, "d": "dev-1", "b": 1, "n": 1, "t": T, "c": {"api_calls": 42}}


def pack(value: object) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def signed(body: bytes, key: Ed25519PrivateKey = DEVICE_KEY, domain: bytes = USAGE_DOMAIN) -> bytes:
    """An envelope with a genuine signature over ``body``, whatever ``body`` holds."""
    return encode_envelope(body, key.sign(signed_bytes(domain, body)))


def body(**changes: object) -> bytes:
    """The base usage body with ``changes``; a value of ``...`` drops the key."""
    fields = {k: v for k, v in {**BASE, **changes}.items() if v is not ...}
    return pack(fields)


def raw_body(key: str, raw: bytes) -> bytes:
    """The base body with ``key`` (last) holding the raw msgpack bytes ``raw``."""
    rest = pack({k: v for k, v in BASE.items() if k != key})
    return bytes([rest[0] + 1]) + rest[1:] + pack(key) + raw


def reason_of(payload: bytes) -> Reason | None:
    outcome = decode_usage(payload, DEVICE_PUB)
    return outcome.reason if isinstance(outcome, Rejection) else None


# --- round trips --------------------------------------------------------------------------

REPORTS = [
    REPORT,
    UsageReport("dev-1", 1, 2, T, {"api_calls": 1234, "gpu_seconds": 7}),
    UsageReport("A.b_c-9", 0, 0, 0, {}),
    UsageReport("x" * 64, 2**63 - 1, 2**63 - 1, 2**63 - 1, {"z" * 32: 2**63 - 1}),
    UsageReport("dev-1", 5, 1, T, {f"m{i}": i for i in range(64)}),
]
CONTROLS = [
    ControlMessage("dev-1", 1, T, "ok", 1000, 1000, "provisioned"),
    ControlMessage("dev-1", 2, T, "throttle", 500, 150, "low_balance"),
    ControlMessage("dev-1", 3, T, "throttle", 1, 1, "low_balance"),
    ControlMessage("dev-1", 4, T, "throttle", 999, 0, "low_balance"),
    ControlMessage("dev-1", 5, T, "block", 0, -(2**63), "exhausted"),
    ControlMessage("dev-1", 2**63 - 1, 0, "block", 0, 2**63 - 1, "revoked"),
    ControlMessage("dev-1", 6, T, "ok", 1000, 0, "w" * 64),
]


@pytest.mark.parametrize("report", REPORTS)
def test_a_signed_usage_report_decodes_to_itself(report: UsageReport) -> None:
    assert decode_usage(sign_usage(report, DEVICE_KEY), DEVICE_PUB) == report


@pytest.mark.parametrize("message", CONTROLS)
def test_a_signed_control_message_decodes_to_itself(message: ControlMessage) -> None:
    assert decode_control(sign_control(message, GATEWAY_KEY), GATEWAY_PUB) == message


meter_names = st.from_regex(r"[a-z0-9_]{1,32}", fullmatch=True)
uints = st.integers(0, 2**63 - 1)


@settings(max_examples=200, deadline=None)
@given(
    st.from_regex(r"[A-Za-z0-9_.\-]{1,64}", fullmatch=True),
    uints,
    uints,
    uints,
    st.dictionaries(meter_names, uints, max_size=64),
)
def test_any_valid_report_round_trips(
    device: str, boot: int, number: int, time_ms: int, counters: dict[str, int]
) -> None:
    report = UsageReport(device, boot, number, time_ms, counters)
    payload = sign_usage(report, DEVICE_KEY)
    if len(payload) <= MAX_ENVELOPE_BYTES:
        assert decode_usage(payload, DEVICE_PUB) == report
    else:
        assert reason_of(payload) is Reason.OVERSIZED


# --- canonical encoding -----------------------------------------------------------------


def test_a_usage_body_has_keys_v_d_b_n_t_c_in_that_order() -> None:
    fields = msgpack.unpackb(encode_usage_body(REPORT), object_pairs_hook=list)
    assert [key for key, _ in fields] == ["v", "d", "b", "n", "t", "c"]


def test_a_control_body_has_keys_v_d_n_t_s_r_bal_why_in_that_order() -> None:
    fields = msgpack.unpackb(encode_control_body(CONTROLS[1]), object_pairs_hook=list)
    assert [key for key, _ in fields] == ["v", "d", "n", "t", "s", "r", "bal", "why"]


def test_meters_are_encoded_sorted_whatever_the_insertion_order() -> None:
    forwards = UsageReport("dev-1", 1, 1, T, {"a": 1, "b": 2, "c_3": 3})
    backwards = UsageReport("dev-1", 1, 1, T, {"c_3": 3, "b": 2, "a": 1})
    assert encode_usage_body(forwards) == encode_usage_body(backwards)
    counters = msgpack.unpackb(encode_usage_body(backwards), object_pairs_hook=list)[-1][1]
    assert [name for name, _ in counters] == ["a", "b", "c_3"]


def test_the_envelope_is_m_then_s_both_bin() -> None:
    envelope = sign_usage(REPORT, DEVICE_KEY)
    assert envelope.startswith(b"\x82\xa1m\xc4")  # fixmap(2), "m", bin8
    assert msgpack.unpackb(envelope, object_pairs_hook=list)[1][0] == "s"
    assert envelope[-66:-64] == b"\xc4\x40"  # bin8 of 64 bytes, last


def test_integers_take_their_shortest_msgpack_form() -> None:
    counters = {"a": 127, "b": 128, "c": 256, "d": 65_536, "e": 2**32}
    encoded = encode_usage_body(UsageReport("dev-1", 1, 1, T, counters))
    assert encoded.endswith(
        b"\xa1a\x7f" b"\xa1b\xcc\x80" b"\xa1c\xcd\x01\x00" b"\xa1d\xce\x00\x01\x00\x00"
        b"\xa1e\xcf\x00\x00\x00\x01\x00\x00\x00\x00"
    )  # fmt: skip


def test_signing_is_deterministic_so_a_republished_control_is_byte_identical() -> None:
    assert sign_control(CONTROLS[1], GATEWAY_KEY) == sign_control(CONTROLS[1], GATEWAY_KEY)
    assert sign_usage(REPORT, DEVICE_KEY) == sign_usage(REPORT, DEVICE_KEY)


# --- what a signature covers -------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "prefix"),
    [(USAGE_DOMAIN, b"tokens/v1/usage\x00"), (CONTROL_DOMAIN, b"tokens/v1/control\x00")],
)
def test_the_signature_covers_domain_zero_byte_and_body(domain: bytes, prefix: bytes) -> None:
    assert signed_bytes(domain, b"BODY") == prefix + b"BODY"


def test_a_usage_signature_is_ed25519_over_exactly_the_usage_signed_bytes() -> None:
    envelope = msgpack.unpackb(sign_usage(REPORT, DEVICE_KEY))
    body_bytes, signature = envelope["m"], envelope["s"]
    assert body_bytes == encode_usage_body(REPORT)
    DEVICE_PUB.verify(signature, b"tokens/v1/usage\x00" + body_bytes)  # raises if not
    for other in (
        body_bytes,
        b"tokens/v1/usage" + body_bytes,
        b"tokens/v1/control\x00" + body_bytes,
    ):
        with pytest.raises(InvalidSignature):
            DEVICE_PUB.verify(signature, other)


def test_a_control_signature_is_ed25519_over_exactly_the_control_signed_bytes() -> None:
    envelope = msgpack.unpackb(sign_control(CONTROLS[0], GATEWAY_KEY))
    GATEWAY_PUB.verify(envelope["s"], b"tokens/v1/control\x00" + envelope["m"])
    with pytest.raises(InvalidSignature):
        GATEWAY_PUB.verify(envelope["s"], b"tokens/v1/usage\x00" + envelope["m"])


def test_a_signature_under_one_domain_never_verifies_under_the_other() -> None:
    usage_body = encode_usage_body(REPORT)
    as_control = signed(usage_body, DEVICE_KEY, CONTROL_DOMAIN)
    assert reason_of(as_control) is Reason.BAD_SIGNATURE
    control_body = encode_control_body(CONTROLS[0])
    as_usage = signed(control_body, GATEWAY_KEY, USAGE_DOMAIN)
    rejected = decode_control(as_usage, GATEWAY_PUB)
    assert isinstance(rejected, Rejection)
    assert rejected.reason is Reason.BAD_SIGNATURE


def test_envelope_verify_answers_false_for_a_wrong_key_or_signature_and_never_raises() -> None:
    envelope = decode_envelope(sign_usage(REPORT, DEVICE_KEY))
    assert isinstance(envelope, Envelope)
    assert envelope.verify(USAGE_DOMAIN, DEVICE_PUB)
    assert not envelope.verify(USAGE_DOMAIN, GATEWAY_PUB)
    assert not envelope.verify(CONTROL_DOMAIN, DEVICE_PUB)
    assert not Envelope(envelope.body, bytes(64)).verify(USAGE_DOMAIN, DEVICE_PUB)


# --- value objects are valid once built ----------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"version": 2}, Reason.UNSUPPORTED_VERSION),
        ({"device": ""}, Reason.BAD_DEVICE_ID),
        ({"device": "x" * 65}, Reason.BAD_DEVICE_ID),
        ({"device": "dev 1"}, Reason.BAD_DEVICE_ID),
        ({"device": "dev/1"}, Reason.BAD_DEVICE_ID),
        ({"device": "dev+"}, Reason.BAD_DEVICE_ID),
        ({"device": "dev-1\n"}, Reason.BAD_DEVICE_ID),
        ({"boot": -1}, Reason.OUT_OF_RANGE),
        ({"number": 2**63}, Reason.OUT_OF_RANGE),
        ({"device_time_ms": True}, Reason.OUT_OF_RANGE),
        ({"device_time_ms": 1.0}, Reason.OUT_OF_RANGE),
        ({"counters": {"API": 1}}, Reason.BAD_METER),
        ({"counters": {"": 1}}, Reason.BAD_METER),
        ({"counters": {"a" * 33: 1}}, Reason.BAD_METER),
        ({"counters": {"a": -1}}, Reason.OUT_OF_RANGE),
        ({"counters": {"a": 2**63}}, Reason.OUT_OF_RANGE),
        ({"counters": {"a": 1.0}}, Reason.OUT_OF_RANGE),
        ({"counters": {"a": False}}, Reason.OUT_OF_RANGE),
        ({"counters": {f"m{i}": 1 for i in range(65)}}, Reason.OUT_OF_RANGE),
        ({"counters": [("a", 1)]}, Reason.WRONG_TYPE),
    ],
)
def test_a_usage_report_cannot_be_built_out_of_range(
    changes: dict[str, Any], reason: Reason
) -> None:
    fields: dict[str, Any] = {"device": "dev-1", "boot": 1, "number": 1, "device_time_ms": T,
                              "counters": {"a": 1}, **changes}  # fmt: skip
    with pytest.raises(InvalidMessage) as refused:
        UsageReport(**fields)
    assert refused.value.rejection.reason is reason


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"version": 0}, Reason.UNSUPPORTED_VERSION),
        ({"device": "a b"}, Reason.BAD_DEVICE_ID),
        ({"seq": -1}, Reason.OUT_OF_RANGE),
        ({"time_ms": 2**63}, Reason.OUT_OF_RANGE),
        ({"balance": -(2**63) - 1}, Reason.OUT_OF_RANGE),
        ({"balance": 2**63}, Reason.OUT_OF_RANGE),
        ({"state": "paused", "rate_permille": 500}, Reason.OUT_OF_RANGE),
        ({"state": "ok", "rate_permille": 999}, Reason.OUT_OF_RANGE),
        ({"state": "block", "rate_permille": 1}, Reason.OUT_OF_RANGE),
        ({"state": "throttle", "rate_permille": 0}, Reason.OUT_OF_RANGE),
        ({"state": "throttle", "rate_permille": 1000}, Reason.OUT_OF_RANGE),
        ({"state": "throttle", "rate_permille": True}, Reason.OUT_OF_RANGE),
        ({"why": "w" * 65}, Reason.WRONG_TYPE),
        ({"why": 7}, Reason.WRONG_TYPE),
    ],
)
def test_a_control_message_cannot_be_built_out_of_range(
    changes: dict[str, Any], reason: Reason
) -> None:
    fields: dict[str, Any] = {"device": "dev-1", "seq": 1, "time_ms": T, "state": "throttle",
                              "rate_permille": 500, "balance": 5, "why": "low_balance",
                              **changes}  # fmt: skip
    with pytest.raises(InvalidMessage) as refused:
        ControlMessage(**fields)
    assert refused.value.rejection.reason is reason


def test_a_report_keeps_its_own_read_only_copy_of_the_counters() -> None:
    """Changing the caller's dict afterwards cannot change or invalidate a checked report."""
    counters = {"api_calls": 5}
    report = UsageReport("dev-1", 1, 1, T, counters)
    counters["api_calls"] = -1
    counters["NOT A METER"] = 1
    assert dict(report.counters) == {"api_calls": 5}
    with pytest.raises(TypeError):
        report.counters["api_calls"] = 6  # type: ignore[index]
    assert report == UsageReport("dev-1", 1, 1, T, {"api_calls": 5})


@pytest.mark.parametrize(
    ("value", "valid"),
    [("a", True), ("x" * 64, True), ("A-Z.a_z-09", True), ("", False), ("x" * 65, False),
     ("a b", False), ("a/b", False), ("+", False), ("#", False), ("dévice", False),
     ("a\n", False), (7, False), (None, False), (b"dev", False)],
)  # fmt: skip
def test_device_ids_are_1_to_64_of_the_allowed_characters(value: object, valid: bool) -> None:
    assert is_device_id(value) is valid


@pytest.mark.parametrize(
    ("value", "valid"),
    [("a", True), ("z" * 32, True), ("api_calls_2", True), ("", False), ("z" * 33, False),
     ("Api", False), ("a-b", False), ("a.b", False), ("é", False), ("a\n", False),
     (b"a", False), (1, False)],
)  # fmt: skip
def test_meter_names_are_1_to_32_of_lower_case_digits_and_underscore(
    value: object, valid: bool
) -> None:
    assert is_meter_name(value) is valid


def test_public_keys_round_trip_through_hex_and_bad_ones_raise_value_error() -> None:
    text = public_key_hex(DEVICE_KEY)
    assert text == public_key_hex(DEVICE_PUB) == DEVICE_PUB.public_bytes_raw().hex()
    assert public_key_from_hex(text).public_bytes_raw() == DEVICE_PUB.public_bytes_raw()
    for bad in ("00" * 31, "00" * 33, "zz" * 32, ""):
        with pytest.raises(ValueError, match=r"32 bytes|non-hexadecimal"):
            public_key_from_hex(bad)


# --- decoding rejects junk with the right reason --------------------------------------------

GOOD = sign_usage(REPORT, DEVICE_KEY)
SIG = pack("s") + pack(bytes(64))
TIMESTAMP = b"\xd6\xff\x00\x00\x00\x01"  # msgpack ext -1: decoded by msgpack itself

ENVELOPE_CASES = [
    ("5000 bytes of anything", b"\x00" * 5000, Reason.OVERSIZED),
    ("4097 bytes of anything", b"\xc1" * (MAX_ENVELOPE_BYTES + 1), Reason.OVERSIZED),
    ("empty", b"", Reason.MALFORMED),
    ("not msgpack", b"\xc1", Reason.MALFORMED),
    ("truncated", GOOD[:-1], Reason.MALFORMED),
    ("a trailing byte", GOOD + b"\x00", Reason.MALFORMED),
    ("a second object after the envelope", GOOD + GOOD, Reason.MALFORMED),
    ("an extension type", b"\x82\xa1m\xd4\x05\x00" + SIG, Reason.MALFORMED),
    ("a timestamp as the signature", b"\x82\xa1m\xc4\x01x\xa1s" + TIMESTAMP, Reason.MALFORMED),
    ("a timestamp alone", TIMESTAMP, Reason.MALFORMED),
    ("3000 nested arrays", b"\x91" * 3000 + b"\x00", Reason.MALFORMED),
    ("invalid UTF-8 in a key", b"\x82\xa1\xff\xc4\x01x" + SIG, Reason.MALFORMED),
    ("an integer key", b"\x82\x01\xc4\x01x" + SIG, Reason.MALFORMED),
    ("a duplicate key", b"\x83\xa1m\xc4\x01x\xa1m\xc4\x01y" + SIG, Reason.MALFORMED),
    ("an array", pack([b"x", bytes(64)]), Reason.BAD_ENVELOPE),
    ("an integer", pack(7), Reason.BAD_ENVELOPE),
    ("nil", pack(None), Reason.BAD_ENVELOPE),
    ("a bin", pack(b"x"), Reason.BAD_ENVELOPE),
    ("an empty map", pack({}), Reason.BAD_ENVELOPE),
    ("s missing", pack({"m": b"x"}), Reason.BAD_ENVELOPE),
    ("m missing", pack({"s": bytes(64)}), Reason.BAD_ENVELOPE),
    ("an extra key", pack({"m": b"x", "s": bytes(64), "x": 1}), Reason.BAD_ENVELOPE),
    ("bin keys", pack({b"m": b"x", b"s": bytes(64)}), Reason.BAD_ENVELOPE),
    ("m is a str", pack({"m": "x", "s": bytes(64)}), Reason.BAD_ENVELOPE),
    ("m is a map", pack({"m": BASE, "s": bytes(64)}), Reason.BAD_ENVELOPE),
    ("s is a str", pack({"m": b"x", "s": "x" * 64}), Reason.BAD_ENVELOPE),
    ("s is 63 bytes", pack({"m": b"x", "s": bytes(63)}), Reason.BAD_ENVELOPE),
    ("s is 65 bytes", pack({"m": b"x", "s": bytes(65)}), Reason.BAD_ENVELOPE),
    ("s is empty", pack({"m": b"x", "s": b""}), Reason.BAD_ENVELOPE),
    ("a wrong signature", pack({"m": body(), "s": bytes(64)}), Reason.BAD_SIGNATURE),
    ("a wrong signature over junk", pack({"m": b"\xc1", "s": bytes(64)}), Reason.BAD_SIGNATURE),
]  # fmt: skip

BODY_CASES = [
    ("body not msgpack", b"\xc1", Reason.MALFORMED),
    ("body with a trailing byte", body() + b"\x00", Reason.MALFORMED),
    ("body is an array", pack([1, 2]), Reason.BAD_BODY),
    ("body is an integer", pack(1), Reason.BAD_BODY),
    ("body is a str", pack("v=1"), Reason.BAD_BODY),
    ("body is a bin", pack(b"\x80"), Reason.BAD_BODY),
    ("body is nil", pack(None), Reason.BAD_BODY),
    *((f"{key} missing", body(**{key: ...}), Reason.MISSING_FIELD) for key in "vdbntc"),
    ("empty body map", pack({}), Reason.MISSING_FIELD),
    ("v is a bool", body(v=True), Reason.WRONG_TYPE),
    ("v is a str", body(v="1"), Reason.WRONG_TYPE),
    ("v is a float", body(v=1.0), Reason.WRONG_TYPE),
    ("v is 2", body(v=2), Reason.UNSUPPORTED_VERSION),
    ("v is 0", body(v=0), Reason.UNSUPPORTED_VERSION),
    ("v is 2 with another shape", pack({"v": 2, "x": [1]}), Reason.UNSUPPORTED_VERSION),
    ("v is 2**64-1", body(v=2**64 - 1), Reason.UNSUPPORTED_VERSION),
    ("d is an integer", body(d=1), Reason.WRONG_TYPE),
    ("d is a bin", body(d=b"dev-1"), Reason.WRONG_TYPE),
    ("d is nil", body(d=None), Reason.WRONG_TYPE),
    ("d is not a device id", body(d="dev 1"), Reason.BAD_DEVICE_ID),
    ("d is empty", body(d=""), Reason.BAD_DEVICE_ID),
    ("b is a bool", body(b=True), Reason.WRONG_TYPE),
    ("n is a bool", body(n=False), Reason.WRONG_TYPE),
    ("t is a float", body(t=1.5), Reason.WRONG_TYPE),
    ("t is a str", body(t="1795000000000"), Reason.WRONG_TYPE),
    ("b is nil", body(b=None), Reason.WRONG_TYPE),
    ("c is a list", body(c=[42]), Reason.WRONG_TYPE),
    ("c is an integer", body(c=42), Reason.WRONG_TYPE),
    ("a counter is a bool", body(c={"api_calls": True}), Reason.WRONG_TYPE),
    ("a counter is a float", body(c={"api_calls": 42.0}), Reason.WRONG_TYPE),
    ("a counter is a str", body(c={"api_calls": "42"}), Reason.WRONG_TYPE),
    ("a counter is nil", body(c={"api_calls": None}), Reason.WRONG_TYPE),
    ("a counter is a map", body(c={"api_calls": {"x": 1}}), Reason.WRONG_TYPE),
    ("b is 2**63", body(b=2**63), Reason.OUT_OF_RANGE),
    ("n is 2**64-1", body(n=2**64 - 1), Reason.OUT_OF_RANGE),
    ("t is 2**63", body(t=2**63), Reason.OUT_OF_RANGE),
    ("a counter is 2**63", body(c={"api_calls": 2**63}), Reason.OUT_OF_RANGE),
    ("b is negative", body(b=-1), Reason.OUT_OF_RANGE),
    ("n is -2**63", body(n=-(2**63)), Reason.OUT_OF_RANGE),
    ("a counter is negative", body(c={"api_calls": -1}), Reason.OUT_OF_RANGE),
    ("65 meters", body(c={f"m{i}": 1 for i in range(65)}), Reason.OUT_OF_RANGE),
    ("an empty meter name", body(c={"": 1}), Reason.BAD_METER),
    ("an upper-case meter name", body(c={"Api": 1}), Reason.BAD_METER),
    ("a meter name with a dash", body(c={"api-calls": 1}), Reason.BAD_METER),
    ("a meter name with a dot", body(c={"api.calls": 1}), Reason.BAD_METER),
    ("a 33-character meter name", body(c={"a" * 33: 1}), Reason.BAD_METER),
    ("a non-ASCII meter name", body(c={"café": 1}), Reason.BAD_METER),
    ("a bin meter name", body(c={b"api": 1}), Reason.BAD_METER),
    ("an integer meter name", raw_body("c", b"\x81\x01\x01"), Reason.MALFORMED),
    ("an extension type in c", raw_body("c", b"\x81\xa1a\xd4\x05\x00"), Reason.MALFORMED),
    ("an extension type under an unknown key", raw_body("x", b"\xd4\x05\x00"), Reason.MALFORMED),
    ("a timestamp under an unknown key", raw_body("x", TIMESTAMP), Reason.MALFORMED),
    ("a timestamp in a list, unknown key", raw_body("x", b"\x91" + TIMESTAMP), Reason.MALFORMED),
    ("a timestamp as t", raw_body("t", TIMESTAMP), Reason.MALFORMED),
    ("2000 nested arrays, unknown key", raw_body("x", b"\x91" * 2000 + b"\x00"), Reason.MALFORMED),
    ("invalid UTF-8 in d", raw_body("d", b"\xa5dev-\xff"), Reason.MALFORMED),
    ("invalid UTF-8 in a meter name", raw_body("c", b"\x81\xa2a\xff\x01"), Reason.MALFORMED),
    ("a duplicate body key", b"\x87" + pack(BASE)[1:] + pack("v") + b"\x02", Reason.MALFORMED),
    ("a duplicate meter", raw_body("c", b"\x82\xa1a\x01\xa1a\x02"), Reason.MALFORMED),
]  # fmt: skip


@pytest.mark.parametrize(
    ("payload", "reason"), [c[1:] for c in ENVELOPE_CASES], ids=[c[0] for c in ENVELOPE_CASES]
)
def test_a_bad_envelope_is_rejected_with_its_reason(payload: bytes, reason: Reason) -> None:
    assert reason_of(payload) is reason


@pytest.mark.parametrize(
    ("body_bytes", "reason"), [c[1:] for c in BODY_CASES], ids=[c[0] for c in BODY_CASES]
)
def test_a_bad_body_with_a_genuine_signature_is_rejected_with_its_reason(
    body_bytes: bytes, reason: Reason
) -> None:
    assert reason_of(signed(body_bytes)) is reason
    assert isinstance(decode_usage_body(body_bytes), Rejection)


def test_an_envelope_of_exactly_4096_bytes_is_read_and_one_more_byte_is_refused_unread() -> None:
    def padded(total: int) -> bytes:
        for pad in range(total, 0, -1):
            payload = signed(body(x=bytes(pad)))
            if len(payload) == total:
                return payload
        raise AssertionError(total)

    assert decode_usage(padded(MAX_ENVELOPE_BYTES), DEVICE_PUB) == REPORT
    too_big = padded(MAX_ENVELOPE_BYTES + 1)
    assert reason_of(too_big) is Reason.OVERSIZED
    oversized = decode_envelope(too_big)
    assert isinstance(oversized, Rejection)
    assert oversized.detail == "4097 bytes"


def test_unknown_body_keys_of_any_type_are_ignored() -> None:
    extra = body(x=1, future={"nested": [1, "two", b"3", None, 1.5, True]}, zz="text")
    assert decode_usage(signed(extra), DEVICE_PUB) == REPORT


def test_keys_in_any_order_and_integers_in_any_width_are_accepted() -> None:
    """The signature covers the bytes as sent: the gateway never re-encodes."""
    u64 = lambda n: b"\xcf" + n.to_bytes(8, "big")  # noqa: E731
    reordered = (b"\x86" + pack("c") + b"\x81" + pack("api_calls") + u64(42) + pack("t") + u64(T)
                 + pack("n") + u64(1) + pack("b") + u64(1) + pack("d") + pack("dev-1")
                 + pack("v") + u64(1))  # fmt: skip
    assert reordered != encode_usage_body(REPORT)
    assert decode_usage(signed(reordered), DEVICE_PUB) == REPORT


def test_64_meters_are_accepted() -> None:
    counters = {f"m{i}": i for i in range(64)}
    outcome = decode_usage(signed(body(c=counters)), DEVICE_PUB)
    assert isinstance(outcome, UsageReport)
    assert dict(outcome.counters) == counters


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"s": "paused"}, Reason.OUT_OF_RANGE),
        ({"s": "ok", "r": 500}, Reason.OUT_OF_RANGE),
        ({"r": 500.0}, Reason.WRONG_TYPE),
        ({"bal": "5"}, Reason.WRONG_TYPE),
        ({"bal": 2**63}, Reason.OUT_OF_RANGE),
        ({"n": -1}, Reason.OUT_OF_RANGE),
        ({"why": ...}, Reason.MISSING_FIELD),
        ({"why": b"refill"}, Reason.WRONG_TYPE),
        ({"v": 2}, Reason.UNSUPPORTED_VERSION),
    ],
)
def test_a_bad_control_body_is_rejected_with_its_reason(
    changes: dict[str, object], reason: Reason
) -> None:
    fields = {"v": 1, "d": "dev-1", "n": 2, "t": T, "s": "throttle", "r": 500, "bal": 15,
              "why": "low_balance", **changes}  # fmt: skip
    control_body = pack({k: v for k, v in fields.items() if v is not ...})
    outcome = decode_control(signed(control_body, GATEWAY_KEY, CONTROL_DOMAIN), GATEWAY_PUB)
    assert isinstance(outcome, Rejection)
    assert outcome.reason is reason
    assert isinstance(decode_control_body(control_body), Rejection)


# --- the published test vectors ------------------------------------------------------------

VECTORS_PATH = Path(__file__).resolve().parent.parent / "docs" / "test-vectors.json"
VECTORS: dict[str, Any] = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))


def vector_key(vector: dict[str, Any]) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(vector["private_key"]))


def test_the_vector_file_is_exactly_what_the_generator_writes() -> None:
    """docs/test-vectors.json is regenerated (scripts/make_test_vectors.py), never hand-edited."""
    from scripts.make_test_vectors import build

    assert VECTORS_PATH.read_text(encoding="utf-8") == json.dumps(build(), indent=2) + "\n"


def test_the_vectors_use_the_fixed_seeds_and_cover_every_state() -> None:
    assert VECTORS["device_key"]["private_key"] == bytes(range(32)).hex()
    assert VECTORS["gateway_key"]["private_key"] == bytes(range(32, 64)).hex()
    for name in ("device_key", "gateway_key"):
        public = vector_key(VECTORS[name]).public_key().public_bytes_raw().hex()
        assert public == VECTORS[name]["public_key"]
    usage = [v for v in VECTORS["valid"] if v["kind"] == "usage"]
    control = [v for v in VECTORS["valid"] if v["kind"] == "control"]
    assert {v["fields"]["s"] for v in control} == {"ok", "throttle", "block"}
    assert any(len(v["fields"]["c"]) > 1 for v in usage)
    assert any(count == 2**63 - 1 for v in usage for count in v["fields"]["c"].values())
    assert len({v["reason"] for v in VECTORS["invalid"]}) >= 10


@pytest.mark.parametrize("vector", VECTORS["valid"], ids=lambda v: f"{v['kind']}: {v['name']}")
def test_a_valid_vector_is_reproduced_byte_for_byte(vector: dict[str, Any]) -> None:
    key = vector_key(vector)
    assert key.public_key().public_bytes_raw().hex() == vector["public_key"]
    f = vector["fields"]
    if vector["kind"] == "usage":
        assert vector["public_key"] == VECTORS["device_key"]["public_key"]
        report = UsageReport(f["d"], f["b"], f["n"], f["t"], f["c"], f["v"])
        body_bytes, domain = encode_usage_body(report), USAGE_DOMAIN
        envelope = sign_usage(report, key)
    else:
        assert vector["public_key"] == VECTORS["gateway_key"]["public_key"]
        message = ControlMessage(f["d"], f["n"], f["t"], f["s"], f["r"], f["bal"], f["why"], f["v"])
        body_bytes, domain = encode_control_body(message), CONTROL_DOMAIN
        envelope = sign_control(message, key)
    assert body_bytes.hex() == vector["body"]
    assert signed_bytes(domain, body_bytes).hex() == vector["signed_bytes"]
    assert key.sign(signed_bytes(domain, body_bytes)).hex() == vector["signature"]
    assert envelope.hex() == vector["envelope"]
    assert encode_envelope(body_bytes, bytes.fromhex(vector["signature"])) == envelope


@pytest.mark.parametrize("vector", VECTORS["valid"], ids=lambda v: f"{v['kind']}: {v['name']}")
def test_a_valid_vector_decodes_to_its_fields_and_verifies(vector: dict[str, Any]) -> None:
    envelope = bytes.fromhex(vector["envelope"])
    public = public_key_from_hex(vector["public_key"])
    signature = bytes.fromhex(vector["signature"])
    public.verify(signature, bytes.fromhex(vector["signed_bytes"]))  # raises if it does not
    f = vector["fields"]
    if vector["kind"] == "usage":
        report = decode_usage(envelope, public)
        assert isinstance(report, UsageReport)
        assert (report.version, report.device, report.boot, report.number) == (
            f["v"], f["d"], f["b"], f["n"],
        )  # fmt: skip
        assert (report.device_time_ms, dict(report.counters)) == (f["t"], f["c"])
        assert isinstance(decode_control(envelope, public), Rejection)  # wrong domain
    else:
        message = decode_control(envelope, public)
        assert isinstance(message, ControlMessage)
        assert (message.version, message.device, message.seq, message.time_ms) == (
            f["v"], f["d"], f["n"], f["t"],
        )  # fmt: skip
        assert (message.state, message.rate_permille, message.balance, message.why) == (
            f["s"], f["r"], f["bal"], f["why"],
        )  # fmt: skip
        assert isinstance(decode_usage(envelope, public), Rejection)  # wrong domain


@pytest.mark.parametrize("vector", VECTORS["accepted"], ids=lambda v: v["name"])
def test_an_accepted_vector_decodes_to_its_fields(vector: dict[str, Any]) -> None:
    public = public_key_from_hex(VECTORS["device_key"]["public_key"])
    report = decode_usage(bytes.fromhex(vector["envelope"]), public)
    assert isinstance(report, UsageReport)
    f = vector["fields"]
    assert report == UsageReport(f["d"], f["b"], f["n"], f["t"], f["c"], f["v"])


@pytest.mark.parametrize("vector", VECTORS["invalid"], ids=lambda v: v["why"])
def test_an_invalid_vector_is_rejected_with_its_reason(vector: dict[str, str]) -> None:
    registry = Registry()
    public = bytes.fromhex(VECTORS["device_key"]["public_key"])
    registry.devices["dev-0001"] = Device("dev-0001", public, "acme", "dev-0001", 0, 0, 0)
    outcome = verify(vector["device"], bytes.fromhex(vector["envelope"]), registry)
    assert isinstance(outcome, Rejected)
    assert outcome.rejection.reason.value == vector["reason"]

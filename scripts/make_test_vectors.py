"""Write docs/test-vectors.json: the wire format's published test vectors.

Deterministic (Ed25519 signatures are), so running it again reproduces the file byte for
byte; tests/test_wire.py checks the code against the file. Firmware teams (C,
MicroPython) check their encoder, signer and verifier against the same file.

    python scripts/make_test_vectors.py

Three groups:

* ``valid``: what Tokenwell's encoder produces (canonical: keys in the documented order,
  meters sorted, every integer and length in its shortest msgpack form), with every
  intermediate: body, signed bytes, signature, envelope. An encoder must reproduce them.
* ``accepted``: envelopes Tokenwell would not produce but must accept (any key order or
  integer width, unknown keys, exactly 4096 bytes): a decoder must read the fields.
* ``invalid``: usage envelopes on the usage topic of ``device`` that must be rejected
  with ``reason`` (the device ``dev-0001`` is provisioned with the device key).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.wire import (
    CONTROL_DOMAIN,
    MAX_ENVELOPE_BYTES,
    USAGE_DOMAIN,
    ControlMessage,
    UsageReport,
    encode_control_body,
    encode_envelope,
    encode_usage_body,
    sign_control,
    sign_usage,
    signed_bytes,
)

DEVICE_SEED = bytes(range(32))
GATEWAY_SEED = bytes(range(32, 64))
OUT = Path(__file__).resolve().parent.parent / "docs" / "test-vectors.json"
T = 1_795_000_000_000
LONG_ID = "Long-ID." * 8  # 64 characters, the most a device id has
LONG_METERS = {f"m{i:02d}_" + "abcdefghijklmnopqrstuvwxyz0123456789"[:28]: 1000 * i for i in range(15, -1, -1)}  # fmt: skip

REPORTS = [
    ("one meter", UsageReport("dev-0001", 1, 1, T, {"api_calls": 42})),
    ("two meters", UsageReport("dev-0001", 1, 2, T + 10_000, {"api_calls": 1234, "gpu_seconds": 7})),
    ("no meters; all zero; every kind of id character", UsageReport("meter.A_9-z", 0, 0, 0, {})),
    ("the largest counter, 2**63-1", UsageReport("dev-0001", 3, 9_999_999, T + 123, {"bytes_out": 2**63 - 1})),
    ("meters given unsorted are encoded sorted", UsageReport("dev-0001", 1, 3, T + 20_000, {"zeta": 3, "alpha": 1, "mid_1": 2})),
    ("every integer width: fixint, uint8, uint16, uint32, uint64", UsageReport("dev-0001", 2**32, 65_536, T, {
        "w0_fixint": 127, "w1_uint8": 128, "w1_uint8_max": 255, "w2_uint16": 256,
        "w2_uint16_max": 65_535, "w4_uint32": 65_536, "w4_uint32_max": 2**32 - 1, "w8_uint64": 2**32,
    })),
    ("16 meters (map16), 32-character names and a 64-character id (str8), a body over 255 bytes (bin16)",
     UsageReport(LONG_ID, 7, 1, T, LONG_METERS)),
]  # fmt: skip
CONTROLS = [
    ("ok on provisioning", ControlMessage("dev-0001", 1, T, "ok", 1000, 1000, "provisioned")),
    ("throttled to 50%", ControlMessage("dev-0001", 2, T + 60_000, "throttle", 500, 150, "low_balance")),
    ("blocked, negative balance (negative fixint)", ControlMessage("dev-0001", 3, T + 120_000, "block", 0, -12, "exhausted")),
    ("throttled to 20%", ControlMessage("dev-0001", 4, T + 150_000, "throttle", 200, 40, "low_balance")),
    ("ok after a refill, large balance", ControlMessage("dev-0001", 5, T + 180_000, "ok", 1000, 2**62, "refill")),
    ("blocked on revocation, balance in int32", ControlMessage("dev-0001", 6, T + 240_000, "block", 0, -40_000, "revoked")),
]  # fmt: skip


def _pack(value: object) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def key_hex(key: Ed25519PrivateKey) -> dict[str, str]:
    return {
        "private_key": key.private_bytes_raw().hex(),
        "public_key": key.public_key().public_bytes_raw().hex(),
    }


def usage_fields(report: UsageReport) -> dict[str, Any]:
    return {"v": report.version, "d": report.device, "b": report.boot, "n": report.number,
            "t": report.device_time_ms, "c": dict(sorted(report.counters.items()))}  # fmt: skip


def control_fields(message: ControlMessage) -> dict[str, Any]:
    return {"v": message.version, "d": message.device, "n": message.seq, "t": message.time_ms,
            "s": message.state, "r": message.rate_permille, "bal": message.balance,
            "why": message.why}  # fmt: skip


def usage_vector(name: str, report: UsageReport, key: Ed25519PrivateKey) -> dict[str, Any]:
    body = encode_usage_body(report)
    envelope = sign_usage(report, key)
    return {"kind": "usage", "name": name, **key_hex(key), "fields": usage_fields(report),
            **_steps(USAGE_DOMAIN, body, envelope)}  # fmt: skip


def control_vector(name: str, message: ControlMessage, key: Ed25519PrivateKey) -> dict[str, Any]:
    body = encode_control_body(message)
    envelope = sign_control(message, key)
    return {"kind": "control", "name": name, **key_hex(key), "fields": control_fields(message),
            **_steps(CONTROL_DOMAIN, body, envelope)}  # fmt: skip


def _steps(domain: bytes, body: bytes, envelope: bytes) -> dict[str, str]:
    return {
        "body": body.hex(),
        "signed_bytes": signed_bytes(domain, body).hex(),
        "signature": msgpack.unpackb(envelope)["s"].hex(),
        "envelope": envelope.hex(),
    }


def _signed(key: Ed25519PrivateKey, body: bytes, domain: bytes = USAGE_DOMAIN) -> bytes:
    return encode_envelope(body, key.sign(signed_bytes(domain, body)))


def _raw_body(fields: dict[str, Any], key: str, raw: bytes) -> bytes:
    """The body map ``fields`` with ``key`` (last) holding the raw msgpack bytes ``raw``."""
    rest = _pack({k: v for k, v in fields.items() if k != key})
    assert 0x80 <= rest[0] < 0x8F, "a fixmap with room for one more key"
    return bytes([rest[0] + 1]) + rest[1:] + _pack(key) + raw


def _u64(n: int) -> bytes:
    return b"\xcf" + struct.pack(">Q", n)


def _wide_ints_body() -> bytes:
    """v d b n t c, but in the order c t n b d v and every integer as uint64 (0xcf)."""
    return (b"\x86" + _pack("c") + b"\x81" + _pack("api_calls") + _u64(42) + _pack("t") + _u64(T)
            + _pack("n") + _u64(1) + _pack("b") + _u64(1) + _pack("d") + _pack("dev-0001")
            + _pack("v") + _u64(1))  # fmt: skip


def _padded_body(total: int, key: Ed25519PrivateKey) -> bytes:
    """A genuine body with an unknown key ``x`` (bin) sized so the envelope is ``total`` bytes."""
    base = {"v": 1, "d": "dev-0001", "b": 1, "n": 1, "t": T, "c": {"api_calls": 42}}
    for pad in range(total, 0, -1):
        body = _pack({**base, "x": bytes(pad)})
        if len(_signed(key, body)) == total:
            return body
    raise AssertionError(f"cannot pad an envelope to {total} bytes")


def accepted_vectors(device: Ed25519PrivateKey) -> list[dict[str, Any]]:
    fields = {"v": 1, "d": "dev-0001", "b": 1, "n": 1, "t": T, "c": {"api_calls": 42}}
    return [
        {"name": "keys in another order, every integer as uint64", "fields": fields,
         "envelope": _signed(device, _wide_ints_body()).hex()},
        {"name": f"exactly {MAX_ENVELOPE_BYTES} bytes, padded by an unknown key", "fields": fields,
         "envelope": _signed(device, _padded_body(MAX_ENVELOPE_BYTES, device)).hex()},
    ]  # fmt: skip


def invalid_vectors(device: Ed25519PrivateKey, gateway: Ed25519PrivateKey) -> list[dict[str, str]]:
    report = REPORTS[0][1]
    good = sign_usage(report, device)
    body = encode_usage_body(report)
    flipped = bytearray(good)
    flipped[-1] ^= 0x01
    body_flipped = bytearray(good)
    body_flipped[good.index(b"api_calls")] ^= 0x01
    base: dict[str, Any] = usage_fields(report)

    def signed(**changes: Any) -> bytes:
        return _signed(device, _pack({**base, **changes}))

    sig = _pack("s") + _pack(bytes(64))
    timestamp_ext = b"\xd6\xff" + struct.pack(">I", 1)
    return [
        {"why": "last signature byte flipped", "envelope": bytes(flipped).hex(), "reason": "bad_signature"},
        {"why": "a body byte flipped", "envelope": bytes(body_flipped).hex(), "reason": "bad_signature"},
        {"why": "signed under the control domain", "envelope": _signed(device, body, CONTROL_DOMAIN).hex(), "reason": "bad_signature"},
        {"why": "signed by another key", "envelope": sign_usage(report, gateway).hex(), "reason": "bad_signature"},
        {"why": "truncated by one byte", "envelope": good[:-1].hex(), "reason": "malformed"},
        {"why": "a trailing byte", "envelope": (good + b"\x00").hex(), "reason": "malformed"},
        {"why": "not msgpack", "envelope": b"\xc1".hex(), "reason": "malformed"},
        {"why": "a msgpack extension type", "envelope": (b"\x82\xa1m\xd4\x05\x00" + sig).hex(), "reason": "malformed"},
        {"why": "a msgpack timestamp under an unknown key", "envelope": _signed(device, _raw_body(base, "x", timestamp_ext)).hex(), "reason": "malformed"},
        {"why": "a duplicate envelope key", "envelope": (b"\x83\xa1m" + _pack(body) + b"\xa1m" + _pack(body) + _pack("s") + _pack(msgpack.unpackb(good)["s"])).hex(), "reason": "malformed"},
        {"why": "a duplicate meter in the body", "envelope": _signed(device, _raw_body(base, "c", b"\x82" + _pack("api_calls") + _pack(1) + _pack("api_calls") + _pack(42))).hex(), "reason": "malformed"},
        {"why": "invalid UTF-8 in d", "envelope": _signed(device, _raw_body(base, "d", b"\xa8dev-\xff001")).hex(), "reason": "malformed"},
        {"why": f"larger than {MAX_ENVELOPE_BYTES} bytes", "envelope": _signed(device, _padded_body(MAX_ENVELOPE_BYTES + 1, device)).hex(), "reason": "oversized"},
        {"why": "the envelope is an array", "envelope": _pack([body, bytes(64)]).hex(), "reason": "bad_envelope"},
        {"why": "an extra envelope key", "envelope": _pack({"m": body, "s": bytes(64), "x": 1}).hex(), "reason": "bad_envelope"},
        {"why": "m is a str, not bin", "envelope": _pack({"m": "body", "s": bytes(64)}).hex(), "reason": "bad_envelope"},
        {"why": "a 63-byte signature", "envelope": _pack({"m": body, "s": bytes(63)}).hex(), "reason": "bad_envelope"},
        {"why": "the body is an array", "envelope": _signed(device, _pack([1, 2])).hex(), "reason": "bad_body"},
        {"why": "c is missing", "envelope": _signed(device, _pack({k: v for k, v in base.items() if k != "c"})).hex(), "reason": "missing_field"},
        {"why": "a float counter", "envelope": signed(c={"api_calls": 42.0}).hex(), "reason": "wrong_type"},
        {"why": "n is a bool", "envelope": signed(n=True).hex(), "reason": "wrong_type"},
        {"why": "b is a str", "envelope": signed(b="1").hex(), "reason": "wrong_type"},
        {"why": "v is 2", "envelope": signed(v=2).hex(), "reason": "unsupported_version"},
        {"why": "a negative counter", "envelope": signed(c={"api_calls": -1}).hex(), "reason": "out_of_range"},
        {"why": "a counter of 2**63", "envelope": signed(c={"api_calls": 2**63}).hex(), "reason": "out_of_range"},
        {"why": "65 meters", "envelope": signed(c={f"m{i}": 1 for i in range(65)}).hex(), "reason": "out_of_range"},
        {"why": "an upper-case meter name", "envelope": signed(c={"API_calls": 1}).hex(), "reason": "bad_meter"},
        {"why": "a 33-character meter name", "envelope": signed(c={"a" * 33: 1}).hex(), "reason": "bad_meter"},
        {"why": "d is not a device id", "envelope": signed(d="dev 0001").hex(), "reason": "bad_device_id"},
        {"why": "d names another device", "envelope": signed(d="dev-0002").hex(), "reason": "device_mismatch"},
    ]  # fmt: skip


def build() -> dict[str, Any]:
    device = Ed25519PrivateKey.from_private_bytes(DEVICE_SEED)
    gateway = Ed25519PrivateKey.from_private_bytes(GATEWAY_SEED)
    invalid = [{"device": "dev-0001", **v} for v in invalid_vectors(device, gateway)]
    return {
        "about": "Tokenwell wire format v1 test vectors (docs/protocol.md). Hex throughout. "
        "signed_bytes = DOMAIN + 0x00 + body; signature = Ed25519(private_key, signed_bytes); "
        "envelope = msgpack {'m': body, 's': signature}. 'valid' vectors are canonical "
        "(keys in the documented order, meters sorted, shortest msgpack forms): an encoder "
        "reproduces every byte. 'accepted' envelopes are not canonical but verify and must "
        "be read as 'fields'. 'invalid' vectors are published on the usage topic of "
        "'device' (provisioned with the device key) and must be rejected with 'reason'. "
        "Integers in 'fields' are exact: read them with a 64-bit integer JSON parser, "
        "not as doubles.",
        "usage_domain": USAGE_DOMAIN.decode(),
        "control_domain": CONTROL_DOMAIN.decode(),
        "device_key": key_hex(device),
        "gateway_key": key_hex(gateway),
        "valid": [usage_vector(name, r, device) for name, r in REPORTS]
        + [control_vector(name, c, gateway) for name, c in CONTROLS],
        "accepted": accepted_vectors(device),
        "invalid": invalid,
    }


def main() -> None:
    OUT.write_text(json.dumps(build(), indent=2) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

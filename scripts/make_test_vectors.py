"""Write docs/test-vectors.json: the wire format's published test vectors.

Deterministic (Ed25519 signatures are), so running it again reproduces the file byte for
byte; tests/test_vectors.py checks the code against the file. Firmware teams (C,
MicroPython) check their encoder, signer and verifier against the same file.

    python scripts/make_test_vectors.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.wire import (
    CONTROL_DOMAIN,
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

REPORTS = [
    UsageReport("dev-0001", 1, 1, 1_795_000_000_000, {"api_calls": 42}),
    UsageReport("dev-0001", 1, 2, 1_795_000_010_000, {"api_calls": 1234, "gpu_seconds": 7}),
    UsageReport("meter.A_9-z", 0, 0, 0, {}),
    UsageReport("dev-0001", 3, 9_999_999, 1_795_000_000_123, {"bytes_out": 2**63 - 1}),
]
CONTROLS = [
    ControlMessage("dev-0001", 1, 1_795_000_000_000, "ok", 1000, 1000, "provisioned"),
    ControlMessage("dev-0001", 2, 1_795_000_060_000, "throttle", 500, 150, "low_balance"),
    ControlMessage("dev-0001", 3, 1_795_000_120_000, "block", 0, -12, "exhausted"),
]


def key_hex(key: Ed25519PrivateKey) -> dict[str, str]:
    return {
        "private_key": key.private_bytes_raw().hex(),
        "public_key": key.public_key().public_bytes_raw().hex(),
    }


def usage_vector(report: UsageReport, key: Ed25519PrivateKey) -> dict[str, Any]:
    body = encode_usage_body(report)
    envelope = sign_usage(report, key)
    fields = {"v": report.version, "d": report.device, "b": report.boot, "n": report.number,
              "t": report.device_time_ms, "c": dict(sorted(report.counters.items()))}  # fmt: skip
    return {
        "kind": "usage",
        "fields": fields,
        "body": body.hex(),
        "signed_bytes": signed_bytes(USAGE_DOMAIN, body).hex(),
        "signature": msgpack.unpackb(envelope)["s"].hex(),
        "envelope": envelope.hex(),
    }


def control_vector(message: ControlMessage, key: Ed25519PrivateKey) -> dict[str, Any]:
    body = encode_control_body(message)
    envelope = sign_control(message, key)
    fields = {"v": message.version, "d": message.device, "n": message.seq, "t": message.time_ms,
              "s": message.state, "r": message.rate_permille, "bal": message.balance,
              "why": message.why}  # fmt: skip
    return {
        "kind": "control",
        "fields": fields,
        "body": body.hex(),
        "signed_bytes": signed_bytes(CONTROL_DOMAIN, body).hex(),
        "signature": msgpack.unpackb(envelope)["s"].hex(),
        "envelope": envelope.hex(),
    }


def invalid_vectors(device: Ed25519PrivateKey) -> list[dict[str, str]]:
    good = sign_usage(REPORTS[0], device)
    flipped = bytearray(good)
    flipped[-1] ^= 0x01
    wrong_domain = encode_envelope(
        encode_usage_body(REPORTS[0]),
        device.sign(signed_bytes(CONTROL_DOMAIN, encode_usage_body(REPORTS[0]))),
    )
    float_body = msgpack.packb(
        {"v": 1, "d": "dev-0001", "b": 1, "n": 1, "t": 1, "c": {"api_calls": 1.0}}
    )
    return [
        {"why": "last signature byte flipped", "envelope": bytes(flipped).hex(), "reason": "bad_signature"},
        {"why": "signed under the control domain", "envelope": wrong_domain.hex(), "reason": "bad_signature"},
        {"why": "truncated by one byte", "envelope": good[:-1].hex(), "reason": "malformed"},
        {"why": "a float counter", "envelope": encode_envelope(float_body, device.sign(signed_bytes(USAGE_DOMAIN, float_body))).hex(), "reason": "wrong_type"},
        {"why": "larger than 4096 bytes", "envelope": encode_envelope(b"\x00" * 4100, bytes(64)).hex(), "reason": "oversized"},
    ]  # fmt: skip


def build() -> dict[str, Any]:
    device = Ed25519PrivateKey.from_private_bytes(DEVICE_SEED)
    gateway = Ed25519PrivateKey.from_private_bytes(GATEWAY_SEED)
    return {
        "about": "Tokenwell wire format v1 test vectors (docs/protocol.md). Hex throughout. "
        "signed_bytes = DOMAIN + 0x00 + body; signature = Ed25519(private_key, signed_bytes); "
        "envelope = msgpack {'m': body, 's': signature}. Invalid vectors are usage envelopes "
        "for the device key that must be rejected with the given reason.",
        "usage_domain": USAGE_DOMAIN.decode(),
        "control_domain": CONTROL_DOMAIN.decode(),
        "device_key": key_hex(device),
        "gateway_key": key_hex(gateway),
        "valid": [usage_vector(r, device) for r in REPORTS]
        + [control_vector(c, gateway) for c in CONTROLS],
        "invalid": invalid_vectors(device),
    }


def main() -> None:
    OUT.write_text(json.dumps(build(), indent=2) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

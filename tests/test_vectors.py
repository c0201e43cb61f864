"""The published test vectors (docs/test-vectors.json) match the code, byte for byte."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.errors import Rejection
from gateway.ingest import Registry, Rejected, verify
from gateway.metering import Device
from gateway.wire import (
    CONTROL_DOMAIN,
    USAGE_DOMAIN,
    ControlMessage,
    UsageReport,
    decode_control,
    decode_usage,
    encode_control_body,
    encode_envelope,
    encode_usage_body,
    public_key_from_hex,
    signed_bytes,
)

VECTORS = json.loads((Path(__file__).parent.parent / "docs" / "test-vectors.json").read_text())


def private(name: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(VECTORS[name]["private_key"]))


def test_the_key_pairs_are_consistent() -> None:
    for name in ("device_key", "gateway_key"):
        public = private(name).public_key().public_bytes_raw().hex()
        assert public == VECTORS[name]["public_key"]


def rebuilt_body(vector: dict[str, Any]) -> bytes:
    f = vector["fields"]
    if vector["kind"] == "usage":
        return encode_usage_body(UsageReport(f["d"], f["b"], f["n"], f["t"], f["c"], f["v"]))
    message = ControlMessage(f["d"], f["n"], f["t"], f["s"], f["r"], f["bal"], f["why"], f["v"])
    return encode_control_body(message)


@pytest.mark.parametrize(
    "vector", VECTORS["valid"], ids=lambda v: f"{v['kind']}-{v['fields']['n']}"
)
def test_a_valid_vector_is_reproduced_byte_for_byte(vector: dict[str, Any]) -> None:
    usage = vector["kind"] == "usage"
    key = private("device_key" if usage else "gateway_key")
    body = rebuilt_body(vector)
    assert body.hex() == vector["body"]
    signed = signed_bytes(USAGE_DOMAIN if usage else CONTROL_DOMAIN, body)
    assert signed.hex() == vector["signed_bytes"]
    signature = key.sign(signed)
    assert signature.hex() == vector["signature"]
    assert encode_envelope(body, signature).hex() == vector["envelope"]


@pytest.mark.parametrize(
    "vector", VECTORS["valid"], ids=lambda v: f"{v['kind']}-{v['fields']['n']}"
)
def test_a_valid_vector_decodes_to_its_fields(vector: dict[str, Any]) -> None:
    envelope = bytes.fromhex(vector["envelope"])
    f = vector["fields"]
    if vector["kind"] == "usage":
        report = decode_usage(envelope, public_key_from_hex(VECTORS["device_key"]["public_key"]))
        assert isinstance(report, UsageReport)
        assert (report.device, report.boot, report.number, report.device_time_ms) == (
            f["d"], f["b"], f["n"], f["t"],
        )  # fmt: skip
        assert dict(report.counters) == f["c"]
    else:
        message = decode_control(
            envelope, public_key_from_hex(VECTORS["gateway_key"]["public_key"])
        )
        assert isinstance(message, ControlMessage)
        assert (message.seq, message.state, message.rate_permille, message.balance) == (
            f["n"], f["s"], f["r"], f["bal"],
        )  # fmt: skip


@pytest.mark.parametrize("vector", VECTORS["invalid"], ids=lambda v: v["why"])
def test_an_invalid_vector_is_rejected_with_its_reason(vector: dict[str, str]) -> None:
    registry = Registry()
    public = bytes.fromhex(VECTORS["device_key"]["public_key"])
    registry.devices["dev-0001"] = Device("dev-0001", public, "acme", 100, 0, 0, 0)
    outcome = verify("dev-0001", bytes.fromhex(vector["envelope"]), registry)
    assert isinstance(outcome, Rejected)
    assert outcome.rejection.reason.value == vector["reason"]


def test_the_file_is_what_the_generator_writes() -> None:
    """docs/test-vectors.json is regenerated, not hand-edited."""
    from scripts.make_test_vectors import build

    assert build() == VECTORS


def test_a_control_vector_under_the_usage_domain_does_not_verify() -> None:
    vector = next(v for v in VECTORS["valid"] if v["kind"] == "control")
    body = bytes.fromhex(vector["body"])
    forged = encode_envelope(body, private("gateway_key").sign(signed_bytes(USAGE_DOMAIN, body)))
    outcome = decode_control(forged, public_key_from_hex(VECTORS["gateway_key"]["public_key"]))
    assert isinstance(outcome, Rejection)
    assert outcome.reason.value == "bad_signature"

"""Junk in, rejection out: the decoder and the verify step never raise, whatever the bytes."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import Rejection
from gateway.ingest import Registry, Rejected, verify
from gateway.metering import Device
from gateway.wire import UsageReport, decode_envelope, decode_usage_body, sign_usage

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
GOOD = sign_usage(UsageReport("dev-1", 1, 1, 1_795_000_000_000, {"api_calls": 42}), KEY)
REGISTRY = Registry()
REGISTRY.devices["dev-1"] = Device("dev-1", KEY.public_key().public_bytes_raw(), "a", 1, 0, 0, 0)


@st.composite
def mutations(draw: st.DrawFn) -> bytes:
    """A valid envelope with bits flipped, bytes cut, inserted or replaced."""
    data = bytearray(GOOD)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "replace"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 8))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif data:
            data[at] = draw(st.integers(0, 255))
    return bytes(data)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=5000), mutations()))
def test_any_bytes_decode_to_a_rejection_or_a_valid_value(payload: bytes) -> None:
    envelope = decode_envelope(payload)
    if isinstance(envelope, Rejection):
        return
    body = decode_usage_body(envelope.body)
    assert isinstance(body, UsageReport | Rejection)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=300), mutations()), st.one_of(st.none(), st.text(max_size=80)))
def test_verify_never_raises_and_only_accepts_the_genuine_report(
    payload: bytes, topic_id: str | None
) -> None:
    outcome = verify(topic_id, payload, REGISTRY)
    if isinstance(outcome, UsageReport):
        assert topic_id == "dev-1"
        assert outcome.device == "dev-1"
        assert dict(outcome.counters) == {"api_calls": 42}  # nothing else carries the signature
    else:
        assert isinstance(outcome, Rejected)

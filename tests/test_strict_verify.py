"""libsodium's strict check (``Envelope.verifies_strictly``, the receiver's vouching)
against OpenSSL's (``Envelope.verify``, the gateway's full check): the same answer for
honest and for corrupted signatures, never True where OpenSSL says False, and False for
what only a lax verifier accepts (a small-order key), which the gateway then checks again
in full."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.ingest import vouching_key
from gateway.wire import (
    CONTROL_DOMAIN,
    USAGE_DOMAIN,
    Envelope,
    UsageReport,
    encode_envelope,
    sign_usage,
    signed_bytes,
)

# Ed25519's neutral element (order 1) as a public key, and a signature that satisfies the
# verification equation for it with any message: R = the neutral element, S = 0.
SMALL_ORDER_KEY = bytes([1]) + bytes(31)
ANY_MESSAGE_SIGNATURE = bytes([1]) + bytes(31) + bytes(32)


def _openssl(envelope: Envelope, domain: bytes, public_key: bytes) -> bool:
    try:
        key = Ed25519PublicKey.from_public_bytes(public_key)
    except ValueError:
        return False
    return envelope.verify(domain, key)


@settings(max_examples=60)
@given(st.binary(max_size=300), st.integers(0, 64 * 8 - 1))
def test_honest_and_corrupted_signatures_get_the_same_answer(body: bytes, bit: int) -> None:
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes_raw()
    signature = key.sign(signed_bytes(USAGE_DOMAIN, body))
    honest = Envelope(body, signature)
    assert honest.verifies_strictly(USAGE_DOMAIN, public)
    assert _openssl(honest, USAGE_DOMAIN, public)
    assert not honest.verifies_strictly(CONTROL_DOMAIN, public)  # another domain
    flipped = bytearray(signature)
    flipped[bit // 8] ^= 1 << (bit % 8)
    corrupted = Envelope(body, bytes(flipped))
    assert corrupted.verifies_strictly(USAGE_DOMAIN, public) is False
    assert _openssl(corrupted, USAGE_DOMAIN, public) is False


@settings(max_examples=200)
@given(
    st.binary(max_size=100),
    st.binary(min_size=64, max_size=64),
    st.binary(min_size=32, max_size=32),
)
def test_what_libsodium_accepts_openssl_accepts(body: bytes, signature: bytes, key: bytes) -> None:
    envelope = Envelope(body, signature)
    if envelope.verifies_strictly(USAGE_DOMAIN, key):
        assert _openssl(envelope, USAGE_DOMAIN, key)


def test_a_small_order_key_is_refused_strictly_and_left_to_the_full_check() -> None:
    forged = Envelope(b"anything at all", ANY_MESSAGE_SIGNATURE)
    assert _openssl(forged, USAGE_DOMAIN, SMALL_ORDER_KEY)  # the lax check: any message
    assert not forged.verifies_strictly(USAGE_DOMAIN, SMALL_ORDER_KEY)
    # So the receiver does not vouch for it, and the gateway's full check decides, as it
    # did before libsodium: nothing is accepted that was not accepted before.
    payload = encode_envelope(forged.body, forged.signature)
    assert vouching_key("odd", payload, {"odd": SMALL_ORDER_KEY}) is None


def test_bad_keys_and_signatures_are_false_never_an_exception() -> None:
    envelope = Envelope(b"body", bytes(64))
    for key in (b"", b"short", bytes(33), bytes(32)):
        assert envelope.verifies_strictly(USAGE_DOMAIN, key) is False
    assert Envelope(b"body", b"").verifies_strictly(USAGE_DOMAIN, bytes(32)) is False


def test_the_receiver_vouches_with_the_strict_check() -> None:
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes_raw()
    payload = sign_usage(UsageReport("dev-1", 1, 1, 1_800_000_000_000, {"api": 1}), key)
    assert vouching_key("dev-1", payload, {"dev-1": public}) == public
    assert vouching_key("dev-2", payload, {"dev-1": public}) is None  # no key: no vouching
    other = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    assert vouching_key("dev-1", payload, {"dev-1": other}) is None

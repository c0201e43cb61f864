"""The wire format (contract §3 to §5): signed msgpack envelopes, usage reports, control messages.

Pure: no sockets, no clock, no globals that change. The device simulator encodes with the
functions the gateway decodes with, so a round trip is a unit test with no broker.

An envelope is a msgpack map with exactly two keys, ``"m"`` (bin: the body, itself msgpack)
and ``"s"`` (bin: 64-byte Ed25519 signature over ``DOMAIN + b"\\x00" + m``).

Decoding never raises for bad input: :func:`decode_usage` and :func:`decode_control` return
either a value object or a :class:`~gateway.errors.Rejection` carrying a reason code, the way
wsproto turns a parse failure into an event. Value objects validate themselves when built:
if a :class:`UsageReport` exists, its fields are in range (constructing one from bad values
raises :class:`~gateway.errors.InvalidMessage`, a caller bug).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from types import MappingProxyType
from typing import Any, Final, Literal, NamedTuple, TypeVar

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nacl.bindings import crypto_core_ed25519_is_valid_point, crypto_sign_open
from nacl.exceptions import BadSignatureError

from gateway.errors import InvalidMessage, Reason, Rejection

T = TypeVar("T")

PROTOCOL_VERSION: Final = 1
USAGE_DOMAIN: Final = b"tokens/v1/usage"
CONTROL_DOMAIN: Final = b"tokens/v1/control"
MAX_ENVELOPE_BYTES: Final = 4096
SIGNATURE_BYTES: Final = 64
PUBLIC_KEY_BYTES: Final = 32
MAX_UINT: Final = 2**63 - 1
MIN_INT: Final = -(2**63)
MAX_METERS: Final = 64

DEVICE_ID = re.compile(r"[A-Za-z0-9_.\-]{1,64}\Z")
METER_NAME = re.compile(r"[a-z0-9_]{1,32}\Z")

ControlState = Literal["ok", "throttle", "block"]
CONTROL_STATES: Final = ("ok", "throttle", "block")


def is_device_id(value: object) -> bool:
    """True when ``value`` is a valid device id: 1 to 64 of ``A-Z a-z 0-9 _ . -``."""
    return isinstance(value, str) and DEVICE_ID.match(value) is not None


def is_meter_name(value: object) -> bool:
    """True when ``value`` is a valid meter name: 1 to 32 of ``a-z 0-9 _``."""
    return isinstance(value, str) and METER_NAME.match(value) is not None


def _is_uint(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_UINT


def _is_int(value: object) -> bool:
    return type(value) is int and MIN_INT <= value <= MAX_UINT


@dataclass(frozen=True, slots=True)
class UsageReport:
    """A device's signed statement of its cumulative counters (contract §4).

    ``counters`` maps meter name to the cumulative count since boot epoch ``boot`` began;
    the report keeps a read-only copy, so a caller changing its dict afterwards cannot
    change (or invalidate) a report that has already been checked.
    Raises :class:`InvalidMessage` when built from out-of-range values.
    """

    device: str
    boot: int
    number: int
    device_time_ms: int
    counters: Mapping[str, int] = field(default_factory=dict)
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if self.version != PROTOCOL_VERSION:
            raise InvalidMessage(Reason.UNSUPPORTED_VERSION, f"v={self.version!r}")
        if not is_device_id(self.device):
            raise InvalidMessage(Reason.BAD_DEVICE_ID, repr(self.device)[:80])
        for name, value in (("b", self.boot), ("n", self.number), ("t", self.device_time_ms)):
            if not _is_uint(value):
                raise InvalidMessage(Reason.OUT_OF_RANGE, f"{name}={value!r}"[:80])
        if not isinstance(self.counters, Mapping):
            raise InvalidMessage(Reason.WRONG_TYPE, "c must be a map")
        if len(self.counters) > MAX_METERS:
            raise InvalidMessage(Reason.OUT_OF_RANGE, f"{len(self.counters)} meters")
        counters = MappingProxyType(dict(self.counters))
        object.__setattr__(self, "counters", counters)  # frozen: the one sanctioned write
        for meter, count in counters.items():
            if not is_meter_name(meter):
                raise InvalidMessage(Reason.BAD_METER, repr(meter)[:80])
            if not _is_uint(count):
                raise InvalidMessage(Reason.OUT_OF_RANGE, f"c.{meter}={count!r}"[:80])


@dataclass(frozen=True, slots=True)
class ControlMessage:
    """The gateway's signed instruction to one device (contract §5).

    ``rate_permille`` is 1000 in ``ok``, 0 in ``block`` and strictly between in ``throttle``.
    Raises :class:`InvalidMessage` when built from out-of-range values.
    """

    device: str
    seq: int
    time_ms: int
    state: ControlState
    rate_permille: int
    balance: int
    why: str
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if self.version != PROTOCOL_VERSION:
            raise InvalidMessage(Reason.UNSUPPORTED_VERSION, f"v={self.version!r}")
        if not is_device_id(self.device):
            raise InvalidMessage(Reason.BAD_DEVICE_ID, repr(self.device)[:80])
        check_control_fields(
            self.seq, self.time_ms, self.state, self.rate_permille, self.balance, self.why
        )


_CONTROL_FIELDS = tuple(f.name for f in dataclass_fields(ControlMessage))


def check_control_fields(
    seq: object, time_ms: object, state: object, rate: object, balance: object, why: object
) -> None:
    """Raise :class:`InvalidMessage` unless these are a valid control message's ``n``,
    ``t``, ``s``, ``r``, ``bal`` and ``why`` (the checks of :class:`ControlMessage` but
    its id and version, without building one: the ledger checks 100,000 at start-up)."""
    if not (_is_uint(seq) and _is_uint(time_ms) and _is_int(balance)):
        raise InvalidMessage(Reason.OUT_OF_RANGE, "n, t or bal")
    if state not in CONTROL_STATES or not _rate_fits(state, rate):
        raise InvalidMessage(Reason.OUT_OF_RANGE, f"s={state!r} r={rate!r}")
    if not isinstance(why, str) or len(why) > 64:
        raise InvalidMessage(Reason.WRONG_TYPE, "why")


def checked_control(values: Sequence[Any]) -> ControlMessage:
    """A :class:`ControlMessage` from field values checked before (a record this gateway
    built and packed), built without checking them again: a fifth of the cost."""
    message = object.__new__(ControlMessage)
    for name, value in zip(_CONTROL_FIELDS, values, strict=True):
        object.__setattr__(message, name, value)
    return message


def _rate_fits(state: object, rate: object) -> bool:
    if type(rate) is not int:
        return False
    if state == "ok":
        return rate == 1000
    if state == "block":
        return rate == 0
    return 0 < rate < 1000


# --- encoding ---------------------------------------------------------------------------


def signed_bytes(domain: bytes, body: bytes) -> bytes:
    """The exact bytes a signature covers: ``domain + b"\\x00" + body``."""
    return domain + b"\x00" + body


def encode_usage_body(report: UsageReport) -> bytes:
    """The canonical msgpack body of ``report`` (keys v, d, b, n, t, c; meters sorted)."""
    return _pack(
        {
            "v": report.version,
            "d": report.device,
            "b": report.boot,
            "n": report.number,
            "t": report.device_time_ms,
            "c": dict(sorted(report.counters.items())),
        }
    )


def encode_control_body(message: ControlMessage) -> bytes:
    """The canonical msgpack body of ``message`` (keys v, d, n, t, s, r, bal, why)."""
    return _pack(
        {
            "v": message.version,
            "d": message.device,
            "n": message.seq,
            "t": message.time_ms,
            "s": message.state,
            "r": message.rate_permille,
            "bal": message.balance,
            "why": message.why,
        }
    )


def encode_envelope(body: bytes, signature: bytes) -> bytes:
    """Wrap a body and its signature into envelope bytes."""
    return _pack({"m": body, "s": signature})


def sign_usage(report: UsageReport, key: Ed25519PrivateKey) -> bytes:
    """Encode and sign ``report`` with the device's key; returns envelope bytes."""
    body = encode_usage_body(report)
    return encode_envelope(body, key.sign(signed_bytes(USAGE_DOMAIN, body)))


def sign_control(message: ControlMessage, key: Ed25519PrivateKey) -> bytes:
    """Encode and sign ``message`` with the gateway's key; returns envelope bytes.

    Ed25519 is deterministic, so the same message always yields the same bytes: a
    re-published control message is byte-identical.
    """
    body = encode_control_body(message)
    return encode_envelope(body, key.sign(signed_bytes(CONTROL_DOMAIN, body)))


def _pack(value: object) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


# --- decoding ---------------------------------------------------------------------------


class Envelope(NamedTuple):
    """A structurally valid envelope: ``body`` bytes and a 64-byte ``signature``. (A named
    tuple: two are built for every report, in the receiver and in the gateway.)"""

    body: bytes
    signature: bytes

    def verify(self, domain: bytes, key: Ed25519PublicKey) -> bool:
        """True when the signature is ``key``'s over ``domain``; never raises."""
        try:
            key.verify(self.signature, signed_bytes(domain, self.body))
        except InvalidSignature:
            return False
        return True

    def verifies_strictly(self, domain: bytes, public_key: bytes) -> bool:
        """True when the signature is the raw 32-byte ``public_key``'s over ``domain``, by
        libsodium's stricter check; never raises.

        libsodium verifies in about 60 % of the time OpenSSL takes (and releases the GIL
        too), and accepts a subset of what :meth:`verify` accepts: the same equation,
        plus refusing small-order or non-canonical keys and ``R``. So a True here is a
        True there; a False must be checked again with :meth:`verify` (an honest device
        never gets one).
        """
        try:
            crypto_sign_open(self.signature + signed_bytes(domain, self.body), public_key)
        except (BadSignatureError, ValueError, TypeError):  # a bad signature, a bad key
            return False
        return True


def _refuse_ext(code: int, data: bytes) -> object:
    raise InvalidMessage(Reason.MALFORMED, f"msgpack extension type {code}")


def _strict_map(pairs: list[tuple[object, object]]) -> dict[object, object]:
    """A map without duplicate keys or timestamps: one set of bytes means one thing.

    msgpack keeps the last of duplicate keys; another decoder (a device's C firmware) may
    keep the first, so a signed message with duplicates could read differently to each.
    """
    mapping = dict(pairs)
    if len(mapping) != len(pairs):
        raise InvalidMessage(Reason.MALFORMED, "duplicate map key")
    _refuse_timestamps(mapping.values())
    return mapping


def _strict_list(items: list[object]) -> list[object]:
    _refuse_timestamps(items)
    return items


def _refuse_timestamps(values: Iterable[object]) -> None:
    # msgpack decodes extension type -1 (timestamp) itself, without calling ext_hook.
    # (``in`` over ``map(type, ...)`` runs in C: a generator cost 1 us a report here.)
    if msgpack.Timestamp in map(type, values):
        raise InvalidMessage(Reason.MALFORMED, "msgpack extension type -1")


def _unpack(data: bytes) -> object:
    """Strict msgpack decode of one object: raises InvalidMessage(MALFORMED) on any failure
    (not msgpack, trailing bytes, invalid UTF-8, extension types, duplicate map keys)."""
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            object_pairs_hook=_strict_map,
            list_hook=_strict_list,
        )
    except InvalidMessage:
        raise
    except Exception as exc:  # msgpack raises a zoo of types; all mean "not msgpack"
        raise InvalidMessage(Reason.MALFORMED, type(exc).__name__) from None
    _refuse_timestamps((obj,))
    return obj


def decode_envelope(data: bytes) -> Envelope | Rejection:
    """Parse envelope bytes; oversized input is rejected unread."""
    if len(data) > MAX_ENVELOPE_BYTES:
        return Rejection(Reason.OVERSIZED, f"{len(data)} bytes")
    try:
        return _envelope(_unpack_envelope(data))
    except InvalidMessage as exc:
        return exc.rejection


def _unpack_envelope(data: bytes) -> object:
    """:func:`_unpack` of an envelope, without its Python hooks for the usual one.

    A map whose header says two entries, decoded to exactly the keys ``m`` and ``s``
    holding bin, has no duplicate key (two entries, two keys), no timestamp and nothing
    nested: msgpack's C decoder alone is as strict there (its errors, trailing bytes
    included, send the bytes to :func:`_unpack` for the same refusal). Anything else is
    decoded by :func:`_unpack`.
    """
    if data[:1] == b"\x82":  # fixmap, two entries
        try:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_refuse_ext)
        except Exception:
            obj = None
        if (
            type(obj) is dict
            and obj.keys() == {"m", "s"}
            and type(obj["m"]) is bytes
            and type(obj["s"]) is bytes
        ):
            return obj
    return _unpack(data)


def _envelope(obj: object) -> Envelope:
    if not isinstance(obj, dict) or set(obj) != {"m", "s"}:
        raise InvalidMessage(Reason.BAD_ENVELOPE, "want a map with exactly keys m and s")
    body, signature = obj["m"], obj["s"]
    if type(body) is not bytes or type(signature) is not bytes:
        raise InvalidMessage(Reason.BAD_ENVELOPE, "m and s must be bin")
    if len(signature) != SIGNATURE_BYTES:
        raise InvalidMessage(Reason.BAD_ENVELOPE, f"signature is {len(signature)} bytes")
    return Envelope(body, signature)


def decode_usage_body(body: bytes) -> UsageReport | Rejection:
    """Parse a usage report body; unknown keys are ignored (forward compatibility)."""
    try:
        fields = _body_map(body)
        _require_int(fields, "v")
        if fields["v"] != PROTOCOL_VERSION:
            raise InvalidMessage(Reason.UNSUPPORTED_VERSION, f"v={fields['v']}")
        device = _require_str(fields, "d")
        boot, number, time_ms = (_require_int(fields, key) for key in ("b", "n", "t"))
        counters = fields.get("c", _MISSING)
        if counters is _MISSING:
            raise InvalidMessage(Reason.MISSING_FIELD, "c")
        if not isinstance(counters, dict):
            raise InvalidMessage(Reason.WRONG_TYPE, "c must be a map")
        for meter, count in counters.items():
            if type(count) is not int:
                raise InvalidMessage(Reason.WRONG_TYPE, f"c.{str(meter)[:40]} must be an integer")
        return UsageReport(device, boot, number, time_ms, counters)
    except InvalidMessage as exc:
        return exc.rejection


def decode_control_body(body: bytes) -> ControlMessage | Rejection:
    """Parse a control message body; unknown keys are ignored."""
    try:
        fields = _body_map(body)
        _require_int(fields, "v")
        if fields["v"] != PROTOCOL_VERSION:
            raise InvalidMessage(Reason.UNSUPPORTED_VERSION, f"v={fields['v']}")
        device, state, why = (_require_str(fields, key) for key in ("d", "s", "why"))
        seq, time_ms, rate, balance = (_require_int(fields, key) for key in ("n", "t", "r", "bal"))
        return ControlMessage(device, seq, time_ms, state, rate, balance, why)  # type: ignore[arg-type]
    except InvalidMessage as exc:
        return exc.rejection


def decode_usage(data: bytes, device_key: Ed25519PublicKey) -> UsageReport | Rejection:
    """Envelope, signature and body in one step, for callers holding the device's key."""
    return _decode_signed(data, USAGE_DOMAIN, device_key, decode_usage_body)


def decode_control(data: bytes, gateway_key: Ed25519PublicKey) -> ControlMessage | Rejection:
    """What a device does with a control payload: verify the gateway's signature, then parse."""
    return _decode_signed(data, CONTROL_DOMAIN, gateway_key, decode_control_body)


def _decode_signed(
    data: bytes, domain: bytes, key: Ed25519PublicKey, parse: Callable[[bytes], T | Rejection]
) -> T | Rejection:
    envelope = decode_envelope(data)
    if isinstance(envelope, Rejection):
        return envelope
    if not envelope.verify(domain, key):
        return Rejection(Reason.BAD_SIGNATURE, "signature does not verify")
    return parse(envelope.body)


_MISSING: Final = object()


def _body_map(body: bytes) -> dict[str, object]:
    obj = _unpack(body)
    if not isinstance(obj, dict):
        raise InvalidMessage(Reason.BAD_BODY, "body must be a msgpack map")
    return obj


def _require_int(fields: Mapping[str, object], key: str) -> int:
    value = fields.get(key, _MISSING)
    if value is _MISSING:
        raise InvalidMessage(Reason.MISSING_FIELD, key)
    if type(value) is not int:
        raise InvalidMessage(Reason.WRONG_TYPE, f"{key} must be an integer")
    return value


def _require_str(fields: Mapping[str, object], key: str) -> str:
    value = fields.get(key, _MISSING)
    if value is _MISSING:
        raise InvalidMessage(Reason.MISSING_FIELD, key)
    if not isinstance(value, str):
        raise InvalidMessage(Reason.WRONG_TYPE, f"{key} must be a string")
    return value


# --- keys -------------------------------------------------------------------------------


def is_usable_public_key(raw: bytes) -> bool:
    """True when ``raw`` is a canonical encoding of a point of Ed25519's prime-order
    subgroup other than the neutral element: what every real key is. Not so for a
    small-order point, for which a signature that verifies (with OpenSSL) over *any*
    message is easy to make: such a key would prove nothing (libsodium's check)."""
    return len(raw) == PUBLIC_KEY_BYTES and bool(crypto_core_ed25519_is_valid_point(raw))


def public_key_from_hex(text: str) -> Ed25519PublicKey:
    """Parse a 32-byte Ed25519 public key from hex; raises ValueError when it is not one."""
    raw = bytes.fromhex(text)
    if len(raw) != PUBLIC_KEY_BYTES:
        raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def public_key_hex(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The raw 32-byte public key, hex-encoded."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes_raw().hex()

"""Verifiable customer statements: the tokens an account's devices were charged over whole
UTC hours, provable offline from the devices' own signed reports. Pure: no I/O, no clock.

Why it can be proved
    Counters are cumulative within a boot epoch and every report is signed by its device
    (contract §3-4). The charging rule debits, for one (device, epoch, meter), between two
    reports ``s`` and ``e`` of that epoch exactly ``charged(c_e) - charged(c_s)`` with
    ``charged(x) = ceil(x * price)``: anyone with the device's public key, the prices and
    the two signed reports recomputes it.

Evidence and its selection
    The ledger keeps, per (device, boot epoch, UTC hour the report was attributed to), the
    latest signed report that raised a counter (:class:`Evidence`). For a window
    ``[since, until)`` of whole hours, an epoch's *start* is its evidence attributed to an
    hour before ``since`` with the greatest ``n`` (none: the epoch began inside the window
    and starts from 0), its *end* the one before ``until`` with the greatest ``n``. An epoch
    with no end, or whose end is its start, was charged nothing in the window.

The document (``format`` ``tokenwell-statement/1``)
    ASCII bytes: ``json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)``
    and one ``"\\n"``; any other bytes for the same content are refused. Keys: ``account``;
    ``since``/``until``/``generated_at`` (RFC 3339 UTC) with ``since_ms``/``until_ms``/
    ``generated_ms``; ``gateway_public_key`` and ``device_keys`` (hex, raw Ed25519);
    ``prices`` (meter -> exact price string); ``epochs`` (device, boot, ``start`` or null,
    ``end``: each ``{n, hour, hour_ms, envelope}``, the envelope in hex exactly as received);
    ``lines`` (one per meter of each epoch's end report, sorted by device, boot, meter, from
    the start report's count, 0 if it lacks the meter: an unpriced meter is listed with
    ``price`` null and 0 tokens; a meter only the start report has gets no line);
    ``totals`` (``account``, and ``devices``: every device of ``device_keys``);
    ``signature``: the gateway's Ed25519 signature (hex) over ``STATEMENT_DOMAIN + b"\\x00"``
    + the canonical JSON (no newline) of every other key.

What a verifier proves, and what not
    That the gateway signed this document; that each boundary report is the device's own,
    signed with the listed key (pin the keys to make that mean something); that every line,
    and every total, is exactly the charging rule applied to those reports and prices.
    Not proved: the hour a report was attributed to (the gateway's claim, signed by the
    gateway, not by the device); that the devices are the account's; that the prices were
    in force all through the window; that no later report existed before a boundary (the
    gateway could pick an older one). Consecutive statements chain, one's end reports being
    the next one's start reports, so a customer keeping them can check that no usage was
    counted twice.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from types import MappingProxyType
from typing import Any, Final, NamedTuple, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.errors import Rejection, TokenwellError
from gateway.pricing import charged, format_price, parse_price
from gateway.wire import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    USAGE_DOMAIN,
    UsageReport,
    decode_envelope,
    decode_usage_body,
    is_device_id,
    is_meter_name,
)

T = TypeVar("T")

FORMAT: Final = "tokenwell-statement/1"
STATEMENT_DOMAIN: Final = b"tokens/v1/statement"
HOUR_MS: Final = 3_600_000
MAX_MS: Final = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z: the last RFC 3339 instant
_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_UNSIGNED_KEYS: Final = frozenset(
    {"format", "account", "since", "since_ms", "until", "until_ms", "generated_at"}
    | {"generated_ms", "gateway_public_key", "device_keys", "prices", "epochs", "lines", "totals"}
)
_EPOCH_KEYS: Final = frozenset({"device", "boot", "start", "end"})
_EVIDENCE_KEYS: Final = frozenset({"n", "hour", "hour_ms", "envelope"})
_LINE_KEYS: Final = ("device", "boot", "meter", "price", "from_units", "to_units", "tokens")


class StatementError(TokenwellError):
    """A statement that does not verify, or evidence that would not: the message says which
    part and why."""


class Evidence(NamedTuple):
    """A device-signed usage report kept as evidence (exactly the bytes received)."""

    device: str
    boot: int
    n: int  # report number (from the signed body)
    hour_ms: int  # start (ms, UTC) of the hour the ledger attributed the report to
    envelope: bytes  # the signed msgpack envelope exactly as received


@dataclass(frozen=True, slots=True)
class Boundaries:
    """One boot epoch's evidence at a window's edges; ``start`` is None when the epoch began
    inside the window."""

    device: str
    boot: int
    start: Evidence | None
    end: Evidence


@dataclass(frozen=True, slots=True)
class StatementLine:
    """Tokens charged for one (device, boot epoch, meter) between its boundary reports;
    ``price`` None (and 0 tokens) for a meter without a price."""

    device: str
    boot: int
    meter: str
    price: Fraction | None
    from_units: int
    to_units: int
    tokens: int


@dataclass(frozen=True, slots=True)
class Statement:
    """A verified statement. Keys are raw 32-byte Ed25519 public keys; ``device_totals``
    has every device of ``device_keys``; ``total`` is the account's."""

    account: str
    since_ms: int
    until_ms: int
    generated_ms: int
    gateway_public_key: bytes
    device_keys: Mapping[str, bytes]
    prices: Mapping[str, Fraction]
    lines: tuple[StatementLine, ...]
    device_totals: Mapping[str, int]
    total: int


# --- selection and recomputation (shared by builder and verifier) --------------------------


def select_boundaries(
    evidence: Iterable[Evidence], *, since_ms: int, until_ms: int
) -> list[Boundaries]:
    """The start and end evidence of every epoch charged in ``[since, until)``, sorted by
    (device, boot). Ties on ``n`` (which a well-behaved device never makes) are broken by
    hour, then envelope bytes, so the choice is deterministic."""
    groups: dict[tuple[str, int], list[Evidence]] = {}
    for item in evidence:
        groups.setdefault((item.device, item.boot), []).append(item)
    selected = []
    for (device, boot), items in sorted(groups.items()):
        start, end = _greatest(items, since_ms), _greatest(items, until_ms)
        if end is not None and (start is None or start.n < end.n):
            selected.append(Boundaries(device, boot, start, end))
    return selected


def _greatest(items: Sequence[Evidence], before_ms: int) -> Evidence | None:
    candidates = [item for item in items if item.hour_ms < before_ms]
    return max(candidates, key=lambda e: (e.n, e.hour_ms, e.envelope), default=None)


def _epoch_lines(
    epoch: Boundaries, key: Ed25519PublicKey, prices: Mapping[str, Fraction]
) -> list[StatementLine]:
    """The lines of one epoch, recomputed from its signed reports. Raises StatementError when
    a report does not decode or verify, or a counter decreases from start to end."""
    end = _read(epoch.end, key, "end")
    before = _read(epoch.start, key, "start").counters if epoch.start else {}
    for meter, value in sorted(before.items()):
        if end.counters.get(meter, value) < value:
            raise StatementError(
                f"{epoch.device} boot {epoch.boot}: meter {meter} decreases from {value}"
                f" (report {_n(epoch.start)}) to {end.counters[meter]} (report {end.number})"
            )
    return [
        _line(epoch, meter, prices.get(meter), before.get(meter, 0), end.counters[meter])
        for meter in sorted(end.counters)
    ]


def _line(epoch: Boundaries, meter: str, price: Fraction | None, lo: int, hi: int) -> StatementLine:
    tokens = 0 if price is None else charged(hi, price) - charged(lo, price)
    return StatementLine(epoch.device, epoch.boot, meter, price, lo, hi, tokens)


def _n(evidence: Evidence | None) -> int | None:
    return None if evidence is None else evidence.n


def _read(item: Evidence, key: Ed25519PublicKey, role: str) -> UsageReport:
    """The report in ``item``'s envelope, once it decodes, verifies under ``key`` (domain
    USAGE_DOMAIN) and its body's d, b, n are the evidence's; else raises StatementError."""
    where = f"{item.device} boot {item.boot}: {role} report"
    envelope = decode_envelope(item.envelope)
    if isinstance(envelope, Rejection):
        raise StatementError(f"{where}: envelope does not decode ({_why(envelope)})")
    if not envelope.verify(USAGE_DOMAIN, key):
        raise StatementError(f"{where}: the device's signature does not verify")
    report = decode_usage_body(envelope.body)
    if isinstance(report, Rejection):
        raise StatementError(f"{where}: body does not decode ({_why(report)})")
    if (report.device, report.boot, report.number) != (item.device, item.boot, item.n):
        raise StatementError(
            f"{where}: the signed body is {report.device!r} boot {report.boot}"
            f" n {report.number}, not {item.device!r} boot {item.boot} n {item.n}"
        )
    return report


def _why(rejection: Rejection) -> str:
    return f"{rejection.reason.value}: {rejection.detail}" if rejection.detail else rejection.reason


def _check_epoch(epoch: Boundaries, since_ms: int, until_ms: int) -> None:
    """Raise StatementError unless the boundaries could have been selected for the window:
    hours whole, start before ``since``, end inside the window, start ``n`` < end ``n``."""
    where = f"{epoch.device} boot {epoch.boot}"
    start, end = epoch.start, epoch.end
    if not (end.hour_ms % HOUR_MS == 0 and since_ms <= end.hour_ms < until_ms):
        raise StatementError(f"{where}: end report's hour {end.hour_ms} is not in the window")
    if start is None:
        return
    if not (start.hour_ms % HOUR_MS == 0 and 0 <= start.hour_ms < since_ms):
        raise StatementError(f"{where}: start report's hour {start.hour_ms} is not before since")
    if start.n >= end.n:
        raise StatementError(f"{where}: start report n {start.n} is not before end n {end.n}")


def _lines(
    epochs: Iterable[Boundaries],
    keys: Mapping[str, Ed25519PublicKey],
    prices: Mapping[str, Fraction],
    since_ms: int,
    until_ms: int,
) -> tuple[StatementLine, ...]:
    """Every line of ``epochs`` (each device's key in ``keys``), checked against the window
    and recomputed from the signed reports; raises StatementError (see _check_epoch and
    _epoch_lines)."""
    lines: list[StatementLine] = []
    for epoch in epochs:
        _check_epoch(epoch, since_ms, until_ms)
        lines += _epoch_lines(epoch, keys[epoch.device], prices)
    return tuple(lines)


def _totals(lines: Iterable[StatementLine], devices: Iterable[str]) -> dict[str, int]:
    totals = dict.fromkeys(devices, 0)
    for line in lines:
        totals[line.device] += line.tokens
    return totals


# --- building -------------------------------------------------------------------------------


def build_statement(
    *,
    account: str,
    since_ms: int,
    until_ms: int,
    public_keys: Mapping[str, bytes],
    prices: Mapping[str, Fraction],
    evidence: Iterable[Evidence],
    generated_ms: int,
    gateway_key: Ed25519PrivateKey,
) -> bytes:
    """The signed statement of ``account`` for ``[since_ms, until_ms)`` (see the module doc).

    ``public_keys`` maps each device of the account to its raw 32-byte Ed25519 key (every
    one is listed, with its total); ``evidence`` may hold any reports of those devices.
    Raises ValueError for bad arguments (a window not of whole hours, a bad key or price, a
    device of the evidence without a key) and StatementError when the evidence itself would
    not verify (a corrupt envelope, a counter that decreases): the gateway never signs a
    statement its customers would reject.
    """
    _check_window(since_ms, until_ms, ValueError)
    if not (isinstance(account, str) and type(generated_ms) is int and 0 <= generated_ms <= MAX_MS):
        raise ValueError("account must be a string and generated_ms a time in range")
    for device in public_keys:
        if not is_device_id(device):
            raise ValueError(f"public_keys: {device!r} is not a device id")
    keys = {device: _public_key(raw, device, ValueError) for device, raw in public_keys.items()}
    _check_prices(prices)
    epochs = select_boundaries(evidence, since_ms=since_ms, until_ms=until_ms)
    unknown = sorted({epoch.device for epoch in epochs} - set(keys))
    if unknown:
        raise ValueError(f"evidence of devices without a public key: {', '.join(unknown)}")
    lines = _lines(epochs, keys, prices, since_ms, until_ms)
    totals = _totals(lines, public_keys)
    statement = Statement(
        account=account,
        since_ms=since_ms,
        until_ms=until_ms,
        generated_ms=generated_ms,
        gateway_public_key=gateway_key.public_key().public_bytes_raw(),
        device_keys=dict(public_keys),
        prices=dict(prices),
        lines=lines,
        device_totals=totals,
        total=sum(totals.values()),
    )
    unsigned = _document(statement, epochs)
    signature = gateway_key.sign(STATEMENT_DOMAIN + b"\x00" + _canonical(unsigned))
    return _canonical({**unsigned, "signature": signature.hex()}) + b"\n"


def _check_window(since_ms: int, until_ms: int, error: type[Exception]) -> None:
    for name, value in (("since_ms", since_ms), ("until_ms", until_ms)):
        if type(value) is not int or value % HOUR_MS or not 0 <= value <= MAX_MS:
            raise error(f"{name} must be a whole UTC hour (a multiple of {HOUR_MS}), not {value}")
    if since_ms >= until_ms:
        raise error(f"since_ms {since_ms} must be before until_ms {until_ms}")


def _check_prices(prices: Mapping[str, Fraction]) -> None:
    for meter, price in prices.items():
        if not (is_meter_name(meter) and isinstance(price, Fraction) and price >= 0):
            raise ValueError(f"price of {meter!r}: want a meter name and a Fraction >= 0")
        try:
            exact = parse_price(format_price(price)) == price
        except ValueError:
            exact = False
        if not exact:
            raise ValueError(f"price of {meter}: {format_price(price)} cannot be written exactly")


def _public_key(raw: object, device: str, error: type[Exception]) -> Ed25519PublicKey:
    if type(raw) is not bytes or len(raw) != PUBLIC_KEY_BYTES:
        raise error(f"public key of {device!r}: want {PUBLIC_KEY_BYTES} raw bytes")
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise error(f"public key of {device!r} is not an Ed25519 key") from None


def _document(statement: Statement, epochs: Iterable[Boundaries]) -> dict[str, Any]:
    """The unsigned JSON document of ``statement`` and its epochs' evidence."""
    s = statement
    return {
        "format": FORMAT,
        "account": s.account,
        "since": _rfc3339(s.since_ms),
        "since_ms": s.since_ms,
        "until": _rfc3339(s.until_ms),
        "until_ms": s.until_ms,
        "generated_at": _rfc3339(s.generated_ms),
        "generated_ms": s.generated_ms,
        "gateway_public_key": s.gateway_public_key.hex(),
        "device_keys": {device: key.hex() for device, key in s.device_keys.items()},
        "prices": {meter: format_price(price) for meter, price in s.prices.items()},
        "epochs": [_epoch_json(epoch) for epoch in epochs],
        "lines": [_line_json(line) for line in s.lines],
        "totals": {"account": s.total, "devices": dict(s.device_totals)},
    }


def _epoch_json(epoch: Boundaries) -> dict[str, Any]:
    start = None if epoch.start is None else _evidence_json(epoch.start)
    return {
        "device": epoch.device,
        "boot": epoch.boot,
        "start": start,
        "end": _evidence_json(epoch.end),
    }


def _evidence_json(item: Evidence) -> dict[str, Any]:
    hour = _rfc3339(item.hour_ms)
    return {"n": item.n, "hour": hour, "hour_ms": item.hour_ms, "envelope": item.envelope.hex()}


def _line_json(line: StatementLine) -> dict[str, Any]:
    price = None if line.price is None else format_price(line.price)
    values = (
        line.device,
        line.boot,
        line.meter,
        price,
        line.from_units,
        line.to_units,
        line.tokens,
    )
    return dict(zip(_LINE_KEYS, values, strict=True))


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _rfc3339(ms: int) -> str:
    moment = _EPOCH + dt.timedelta(milliseconds=ms)  # integer arithmetic: no float rounding
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- verifying ------------------------------------------------------------------------------


def verify_statement(
    data: bytes,
    *,
    gateway_public_key: bytes | None = None,
    device_keys: Mapping[str, bytes] | None = None,
) -> Statement:
    """Check a statement offline and return it parsed; raises StatementError (only) when
    anything is wrong: bytes not canonical, a key not the pinned one (``device_keys`` pins
    every device of the statement: an unpinned one fails), the gateway's or a device's
    signature, evidence that does not fit its epoch or window, a counter that decreases, or
    any line, total or derived field not exactly what the evidence and prices give."""
    doc = _object(_parse_canonical(data), _UNSIGNED_KEYS | {"signature"}, "statement")
    if doc["format"] != FORMAT:
        raise StatementError(f"format {doc['format']!r:.60} is not {FORMAT!r}")
    unsigned = {key: value for key, value in doc.items() if key != "signature"}
    claimed = _parse_inputs(unsigned)
    _check_pins(claimed, gateway_public_key, device_keys)
    signature = _hex(doc, "signature", "statement", SIGNATURE_BYTES)
    _check_signature(claimed.gateway_public_key, signature, unsigned)
    listed = _get(doc, "epochs", list, "statement")
    epochs = [_parse_epoch(value, f"epochs[{i}]") for i, value in enumerate(listed)]
    statement = _recompute(claimed, epochs)
    expected = _document(statement, epochs)
    _compare_lines(expected["lines"], doc["lines"])
    _compare_totals(expected["totals"], doc["totals"])
    for key in sorted(expected):
        if _canonical(expected[key]) != _canonical(doc[key]):
            raise StatementError(f"{key} is not what the statement's inputs give")
    return statement


def _parse_canonical(data: bytes) -> object:
    """The JSON value of ``data``, once ``data`` is exactly its canonical serialization."""
    try:
        value = json.loads(data.decode("ascii"), parse_float=_no_float, parse_constant=_no_float)
        canonical = _canonical(value) + b"\n"
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise StatementError(f"not a JSON statement: {str(exc)[:120]}") from None
    if canonical != data:
        raise StatementError("bytes are not the canonical serialization of the statement")
    return value


def _no_float(text: str) -> object:
    raise ValueError(f"number {text[:40]} is not an integer")


def _parse_inputs(doc: Mapping[str, object]) -> Statement:
    """The statement's inputs (account, window, keys, prices), typed and checked; its lines
    and totals are left empty, to be recomputed."""
    where = "statement"
    since_ms, until_ms = _get(doc, "since_ms", int, where), _get(doc, "until_ms", int, where)
    _check_window(since_ms, until_ms, StatementError)
    generated_ms = _get(doc, "generated_ms", int, where)
    if not 0 <= generated_ms <= MAX_MS:
        raise StatementError(f"generated_ms {generated_ms} is out of range")
    keys = _get(doc, "device_keys", dict, where)
    for device in keys:
        if not is_device_id(device):
            raise StatementError(f"device_keys: {device[:80]!r} is not a device id")
    return Statement(
        account=_get(doc, "account", str, where),
        since_ms=since_ms,
        until_ms=until_ms,
        generated_ms=generated_ms,
        gateway_public_key=_hex(doc, "gateway_public_key", where, PUBLIC_KEY_BYTES),
        device_keys={
            device: _hex(keys, device, "device_keys", PUBLIC_KEY_BYTES) for device in keys
        },
        prices=_parse_prices(_get(doc, "prices", dict, where)),
        lines=(),
        device_totals={},
        total=0,
    )


def _parse_prices(prices: Mapping[str, object]) -> dict[str, Fraction]:
    parsed = {}
    for meter in prices:
        text = _get(prices, meter, str, "prices")
        try:
            price = parse_price(text)
        except ValueError as exc:
            raise StatementError(f"prices.{meter[:40]}: {exc}") from None
        if not is_meter_name(meter) or format_price(price) != text:
            raise StatementError(f"prices.{meter[:40]}: not a meter and exact price string")
        parsed[meter] = price
    return parsed


def _check_pins(
    claimed: Statement, gateway: bytes | None, devices: Mapping[str, bytes] | None
) -> None:
    if gateway is not None and claimed.gateway_public_key != gateway:
        raise StatementError(
            f"gateway key {claimed.gateway_public_key.hex()} is not the pinned {gateway.hex()}"
        )
    if devices is None:
        return
    for device, key in sorted(claimed.device_keys.items()):
        if device not in devices:
            raise StatementError(f"device {device!r} has no pinned key")
        if devices[device] != key:
            raise StatementError(f"device {device!r}: key {key.hex()} is not the pinned one")


def _check_signature(public: bytes, signature: bytes, unsigned: Mapping[str, object]) -> None:
    key = _public_key(public, "the gateway", StatementError)
    try:
        key.verify(signature, STATEMENT_DOMAIN + b"\x00" + _canonical(unsigned))
    except InvalidSignature:
        raise StatementError("the gateway's signature does not verify") from None


def _parse_epoch(value: object, where: str) -> Boundaries:
    fields = _object(value, _EPOCH_KEYS, where)
    device, boot = _get(fields, "device", str, where), _get(fields, "boot", int, where)
    start = None
    if fields["start"] is not None:
        start = _parse_evidence(fields["start"], device, boot, f"{where}.start")
    return Boundaries(device, boot, start, _parse_evidence(fields["end"], device, boot, where))


def _parse_evidence(value: object, device: str, boot: int, where: str) -> Evidence:
    fields = _object(value, _EVIDENCE_KEYS, where)
    n, hour_ms = _get(fields, "n", int, where), _get(fields, "hour_ms", int, where)
    return Evidence(device, boot, n, hour_ms, _hex(fields, "envelope", where))


def _recompute(claimed: Statement, epochs: Sequence[Boundaries]) -> Statement:
    """``claimed`` with its lines and totals recomputed from ``epochs``' evidence."""
    for i, epoch in enumerate(epochs):
        if i and (epochs[i - 1].device, epochs[i - 1].boot) >= (epoch.device, epoch.boot):
            raise StatementError(f"epochs[{i}]: epochs are not sorted by (device, boot), unique")
        if epoch.device not in claimed.device_keys:
            raise StatementError(f"epochs[{i}]: device {epoch.device!r} has no key")
    keys = {d: _public_key(raw, d, StatementError) for d, raw in claimed.device_keys.items()}
    lines = _lines(epochs, keys, claimed.prices, claimed.since_ms, claimed.until_ms)
    totals = _totals(lines, claimed.device_keys)
    return replace(
        claimed,
        device_keys=MappingProxyType(dict(claimed.device_keys)),
        prices=MappingProxyType(dict(claimed.prices)),
        lines=lines,
        device_totals=MappingProxyType(totals),
        total=sum(totals.values()),
    )


def _compare_lines(expected: Sequence[dict[str, Any]], claimed: object) -> None:
    if not isinstance(claimed, list):
        raise StatementError("lines is not a list")
    for i, want in enumerate(expected):
        name = f"lines[{i}] ({want['device']} boot {want['boot']} {want['meter']})"
        if i >= len(claimed):
            raise StatementError(f"{name} is missing")
        line = _object(claimed[i], frozenset(_LINE_KEYS), f"lines[{i}]")
        for key in _LINE_KEYS:
            if _canonical(line[key]) != _canonical(want[key]):
                raise StatementError(
                    f"{name}: {key} is {_canonical(line[key])[:40]!r},"
                    f" the evidence gives {_canonical(want[key]).decode()}"
                )
    if len(claimed) > len(expected):
        raise StatementError(f"lines[{len(expected)}] is not backed by any evidence")


def _compare_totals(expected: Mapping[str, Any], claimed: object) -> None:
    totals = _object(claimed, frozenset({"account", "devices"}), "totals")
    devices = _object(totals["devices"], frozenset(expected["devices"]), "totals.devices")
    for device, want in sorted(expected["devices"].items()):
        if _canonical(devices[device]) != _canonical(want):
            raise StatementError(f"totals.devices.{device}: is not the sum of its lines, {want}")
    if _canonical(totals["account"]) != _canonical(expected["account"]):
        raise StatementError(f"totals.account is not the sum of the lines, {expected['account']}")


def _object(value: object, keys: frozenset[str], where: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise StatementError(f"{where} is not a JSON object")
    if set(value) != keys:
        odd = sorted(set(value) ^ keys)
        raise StatementError(f"{where}: keys {', '.join(k[:40] for k in odd[:5])} wrong")
    return value


def _get(fields: Mapping[str, object], key: str, kind: type[T], where: str) -> T:
    """``fields[key]`` when it is exactly of type ``kind`` (so ``true`` is no int)."""
    value = fields.get(key)
    if not isinstance(value, kind) or type(value) is not kind:
        raise StatementError(f"{where}.{key[:40]} is not a {kind.__name__}")
    return value


def _hex(fields: Mapping[str, object], key: str, where: str, size: int | None = None) -> bytes:
    """``fields[key]`` as bytes, when it is lowercase hex (``size`` bytes when given)."""
    text = _get(fields, key, str, where)
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = None
    if raw is None or raw.hex() != text or (size is not None and len(raw) != size):
        raise StatementError(f"{where}.{key[:40]} is not {size or 'some'} bytes in lowercase hex")
    return raw

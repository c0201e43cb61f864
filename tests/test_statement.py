"""Verifiable statements (gateway.statement): a built statement verifies offline; any change
to its bytes, or any content the evidence does not back (even re-signed by the gateway),
fails with StatementError and nothing else; the tokens are what the charging rule debits
for the reports attributed to the window; boundaries are picked per boot epoch."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from fractions import Fraction
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway.pricing import charged
from gateway.statement import (
    STATEMENT_DOMAIN,
    Evidence,
    StatementError,
    build_statement,
    select_boundaries,
    verify_statement,
)
from gateway.wire import UsageReport, sign_usage

H = 3_600_000
T0 = 1_795_000_000_000 // H * H  # a whole UTC hour; hours below count from it
KEYS = {
    f"dev-{c}": Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32) for i, c in enumerate("abc")
}
GATEWAY = Ed25519PrivateKey.from_private_bytes(bytes([9]) * 32)
STRANGER = Ed25519PrivateKey.from_private_bytes(bytes([7]) * 32)
PRICES = {"api_calls": Fraction(1, 100), "gpu_seconds": Fraction(1, 3), "frames": Fraction(7, 9)}
METERS = [*PRICES, "unpriced"]
PROPERTY = settings(max_examples=60, deadline=None, derandomize=True)


def raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


PUBLIC = {device: raw(key) for device, key in KEYS.items()}


def report(
    device: str, boot: int, n: int, hour: int, counters: dict[str, int], key: Any = None
) -> Evidence:
    """Evidence of a genuinely signed report ``n`` attributed to hour ``hour`` (from T0)."""
    body = UsageReport(device, boot, n, T0 + hour * H + 1234, counters)
    return Evidence(device, boot, n, T0 + hour * H, sign_usage(body, key or KEYS[device]))


def build(evidence: Iterable[Evidence], since: int = 0, until: int = 3, **changes: Any) -> bytes:
    """A statement of account ``acme`` for hours ``[since, until)`` (from T0)."""
    args: dict[str, Any] = {
        "account": "acme",
        "since_ms": T0 + since * H,
        "until_ms": T0 + until * H,
        "public_keys": PUBLIC,
        "prices": PRICES,
        "evidence": list(evidence),
        "generated_ms": T0 + 100 * H,
        "gateway_key": GATEWAY,
    }
    return build_statement(**{**args, **changes})


def canonical(value: object) -> bytes:
    """The canonical JSON, written independently of the module under test."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def resign(doc: dict[str, Any], key: Ed25519PrivateKey = GATEWAY) -> bytes:
    """``doc`` serialized and signed as a gateway would: what a dishonest gateway can make."""
    unsigned = {k: v for k, v in doc.items() if k != "signature"}
    signature = key.sign(STATEMENT_DOMAIN + b"\x00" + canonical(unsigned))
    return canonical({**unsigned, "signature": signature.hex()}) + b"\n"


def tamper(data: bytes, change: Callable[[dict[str, Any]], object]) -> bytes:
    doc = json.loads(data)
    change(doc)
    return resign(doc)


SMALL = build(
    [report("dev-a", 1, 4, -1, {"api_calls": 250}), report("dev-a", 1, 9, 1, {"api_calls": 1001})]
)
EXAMPLE = build(
    [
        report("dev-a", 1, 4, -2, {"api_calls": 100, "gpu_seconds": 2}),
        report("dev-a", 1, 5, -1, {"api_calls": 250, "gpu_seconds": 2}),  # start: latest before
        report("dev-a", 1, 8, 0, {"api_calls": 400, "gpu_seconds": 4}),
        report("dev-a", 1, 9, 2, {"api_calls": 1001, "gpu_seconds": 4, "unpriced": 7}),  # end
        report("dev-a", 1, 12, 3, {"api_calls": 5000, "gpu_seconds": 9}),  # after until
        report("dev-a", 2, 1, 1, {"frames": 10}),  # new boot epoch inside: starts from 0
        report("dev-b", 3, 2, -5, {"frames": 3}),  # nothing since: end is start
    ]
)


# --- what a statement says ------------------------------------------------------------------


def test_a_built_statement_verifies_to_exactly_its_lines_and_totals() -> None:
    statement = verify_statement(EXAMPLE, gateway_public_key=raw(GATEWAY), device_keys=PUBLIC)
    lines = [
        (ln.device, ln.boot, ln.meter, ln.price, ln.from_units, ln.to_units, ln.tokens)
        for ln in statement.lines
    ]
    assert lines == [
        ("dev-a", 1, "api_calls", Fraction(1, 100), 250, 1001, 11 - 3),
        ("dev-a", 1, "gpu_seconds", Fraction(1, 3), 2, 4, 2 - 1),
        ("dev-a", 1, "unpriced", None, 0, 7, 0),
        ("dev-a", 2, "frames", Fraction(7, 9), 0, 10, 8),
    ]
    assert dict(statement.device_totals) == {"dev-a": 17, "dev-b": 0, "dev-c": 0}
    assert statement.total == 17
    assert (statement.account, statement.since_ms, statement.until_ms) == ("acme", T0, T0 + 3 * H)


def test_the_document_is_canonical_json_with_one_newline_and_the_boundary_evidence() -> None:
    doc = json.loads(EXAMPLE)
    assert canonical(doc) + b"\n" == EXAMPLE
    assert doc["format"] == "tokenwell-statement/1"
    assert (doc["since"], doc["until"]) == ("2026-11-18T11:00:00.000Z", "2026-11-18T14:00:00.000Z")
    assert doc["prices"] == {"api_calls": "0.01", "gpu_seconds": "1/3", "frames": "7/9"}
    assert doc["gateway_public_key"] == raw(GATEWAY).hex()
    assert [
        (e["device"], e["boot"], e["start"] and e["start"]["n"], e["end"]["n"])
        for e in doc["epochs"]
    ] == [
        ("dev-a", 1, 5, 9),
        ("dev-a", 2, None, 1),
    ]
    assert doc["totals"] == {"account": 17, "devices": {"dev-a": 17, "dev-b": 0, "dev-c": 0}}


@pytest.mark.parametrize(
    ("since_ms", "until_ms"),
    [(T0 + 1, T0 + H), (T0, T0 + H - 1), (T0 + H, T0 + H), (T0 + H, T0), (-H, T0)],
)
def test_a_window_must_be_whole_increasing_utc_hours(since_ms: int, until_ms: int) -> None:
    with pytest.raises(ValueError, match=r"whole UTC hour|must be before"):
        build([], since_ms=since_ms, until_ms=until_ms)


def test_the_builder_refuses_what_it_cannot_prove() -> None:
    with pytest.raises(ValueError, match="without a public key: dev-z"):
        build([report("dev-z", 1, 1, 0, {"api_calls": 1}, KEYS["dev-a"])])
    with pytest.raises(StatementError, match="signature does not verify"):
        build([report("dev-a", 1, 1, 0, {"api_calls": 1}, STRANGER)])
    with pytest.raises(StatementError, match="api_calls decreases from 9"):
        build(
            [
                report("dev-a", 1, 1, -1, {"api_calls": 9}),
                report("dev-a", 1, 2, 0, {"api_calls": 8}),
            ]
        )
    with pytest.raises(ValueError, match="cannot be written exactly"):
        build([], prices={"api_calls": Fraction(1, 10**19)})


# --- window selection -----------------------------------------------------------------------


def test_boundaries_are_the_latest_evidence_before_since_and_before_until() -> None:
    items = [
        report("dev-a", 1, n, hour, {"api_calls": n})
        for n, hour in [(1, -3), (2, -1), (3, 0), (4, 1), (5, 2), (6, 5)]
    ]
    [epoch] = select_boundaries(items, since_ms=T0, until_ms=T0 + 2 * H)
    assert (epoch.start and epoch.start.n, epoch.end.n) == (2, 4)


def test_an_epoch_begun_inside_the_window_starts_from_zero() -> None:
    items = [
        report("dev-a", 2, 3, 1, {"api_calls": 700}),
        report("dev-a", 2, 4, 4, {"api_calls": 900}),
    ]
    [epoch] = select_boundaries(items, since_ms=T0, until_ms=T0 + 3 * H)
    assert (epoch.start, epoch.end.n) == (None, 3)
    [line] = verify_statement(build(items)).lines
    assert (line.from_units, line.to_units, line.tokens) == (0, 700, 7)


def test_epochs_with_no_report_in_the_window_contribute_nothing() -> None:
    before = [
        report("dev-a", 1, 1, -2, {"api_calls": 5}),
        report("dev-a", 1, 2, -1, {"api_calls": 6}),
    ]
    after = [report("dev-b", 1, 1, 3, {"api_calls": 5})]
    assert select_boundaries(before + after, since_ms=T0, until_ms=T0 + 3 * H) == []
    statement = verify_statement(build(before + after))
    assert (statement.lines, statement.total) == ((), 0)


# --- tokens are what the charging rule debits -----------------------------------------------

History = list[tuple[str, int, int, int, dict[str, int]]]  # device, boot, n, hour, counters


@st.composite
def histories(draw: st.DrawFn) -> History:
    """Genuine reports: per device and boot epoch, numbers increase, attributed hours never
    go back, counters only grow and a meter may start being reported part-way."""
    history: History = []
    for device in draw(
        st.lists(st.sampled_from(sorted(KEYS)), min_size=1, max_size=3, unique=True)
    ):
        for boot in draw(st.lists(st.integers(0, 3), min_size=1, max_size=2, unique=True)):
            n, hour, counters = 0, draw(st.integers(-3, 6)), dict[str, int]()
            for _ in range(draw(st.integers(1, 8))):
                n += draw(st.integers(1, 3))
                hour += draw(st.sampled_from([0, 0, 1, 2]))
                for meter in draw(st.lists(st.sampled_from(METERS), max_size=3, unique=True)):
                    counters[meter] = counters.get(meter, 0) + draw(st.integers(0, 500))
                history.append((device, boot, n, hour, dict(counters)))
    return history


def debits(history: History) -> list[tuple[str, int, int]]:
    """(device, hour, tokens) the charging rule (contract §4) debits for each report, in order."""
    highs: dict[tuple[str, int, str], int] = {}
    out = []
    for device, boot, _, hour, counters in history:
        tokens = 0
        for meter, value in counters.items():
            high = highs.get((device, boot, meter), 0)
            if meter in PRICES and value > high:
                tokens += charged(value, PRICES[meter]) - charged(high, PRICES[meter])
                highs[device, boot, meter] = value
        out.append((device, hour, tokens))
    return out


def kept_evidence(history: History) -> list[Evidence]:
    """What the ledger keeps: per (device, boot, hour), the latest report that charged."""
    kept: dict[tuple[str, int, int], tuple[int, dict[str, int]]] = {}
    for (device, boot, n, hour, counters), (_, _, tokens) in zip(
        history, debits(history), strict=True
    ):
        if tokens:
            kept[device, boot, hour] = (n, counters)
    return [report(d, b, n, hour, c) for (d, b, hour), (n, c) in kept.items()]


@PROPERTY
@given(histories(), st.integers(-4, 14), st.integers(1, 8))
def test_statement_tokens_are_the_debits_of_the_reports_attributed_to_the_window(
    history: History, since: int, hours: int
) -> None:
    statement = verify_statement(build(kept_evidence(history), since, since + hours))
    expected = dict.fromkeys(KEYS, 0)
    for device, hour, tokens in debits(history):
        if since <= hour < since + hours:
            expected[device] += tokens
    assert dict(statement.device_totals) == expected
    assert statement.total == sum(expected.values())


@PROPERTY
@given(histories(), st.integers(-4, 12), st.integers(1, 4), st.integers(1, 4))
def test_adjacent_windows_add_up(history: History, a: int, ab: int, bc: int) -> None:
    evidence = kept_evidence(history)
    first = verify_statement(build(evidence, a, a + ab))
    second = verify_statement(build(evidence, a + ab, a + ab + bc))
    whole = verify_statement(build(evidence, a, a + ab + bc))
    for device in KEYS:
        both = first.device_totals[device] + second.device_totals[device]
        assert both == whole.device_totals[device]


# --- any change fails -----------------------------------------------------------------------


def test_every_single_byte_change_of_a_small_statement_fails() -> None:
    assert verify_statement(SMALL).total == 8
    for position, byte in enumerate(SMALL):
        for replacement in {byte ^ 0x01, byte ^ 0x20, byte ^ 0x80, ord("0"), ord(" ")} - {byte}:
            changed = SMALL[:position] + bytes([replacement]) + SMALL[position + 1 :]
            with pytest.raises(StatementError):
                verify_statement(changed)


@PROPERTY
@given(st.data())
def test_any_single_byte_change_of_a_larger_statement_fails(data: st.DataObject) -> None:
    position = data.draw(st.integers(0, len(EXAMPLE) - 1))
    byte = data.draw(st.integers(0, 255).filter(lambda b: b != EXAMPLE[position]))
    with pytest.raises(StatementError):
        verify_statement(EXAMPLE[:position] + bytes([byte]) + EXAMPLE[position + 1 :])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    st.binary(max_size=300)
    | json_values.map(lambda v: canonical(v) + b"\n")
    | st.integers(0, len(EXAMPLE) - 1).map(lambda cut: EXAMPLE[:cut])
)
def test_arbitrary_bytes_only_ever_raise_statement_error(data: bytes) -> None:
    with pytest.raises(StatementError):
        verify_statement(data)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside ``value`` (dict keys and list indexes)."""
    children = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    return [prefix, *(p for key, child in children for p in paths(child, (*prefix, key)))]


@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(st.data())
def test_resigned_content_the_evidence_does_not_back_fails(data: st.DataObject) -> None:
    """What a dishonest gateway could sign: any value replaced anywhere (a line's tokens, a
    count, a type, a key) is caught by recomputation, with StatementError only. (Only the
    account name is the gateway's word alone, like the hours it attributes reports to.)"""
    doc = json.loads(EXAMPLE)
    del doc["signature"]
    path = data.draw(st.sampled_from([p for p in paths(doc) if p not in {(), ("account",)}]))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    new = data.draw(
        json_values
        | st.integers(-3, 3).map(
            lambda d: parent[path[-1]] + d if type(parent[path[-1]]) is int else d
        )
    )
    assume(canonical(new) != canonical(parent[path[-1]]))
    parent[path[-1]] = new
    with pytest.raises(StatementError):
        verify_statement(resign(doc))


def change_line(key: str, delta: int) -> Callable[[dict[str, Any]], object]:
    return lambda doc: doc["lines"][0].update({key: doc["lines"][0][key] + delta})


def swap_boundaries(doc: dict[str, Any]) -> None:
    epoch = doc["epochs"][0]
    epoch["start"], epoch["end"] = epoch["end"], epoch["start"]


def envelope_of(item: Evidence) -> Callable[[dict[str, Any]], object]:
    return lambda doc: doc["epochs"][0]["end"].update(
        {"envelope": item.envelope.hex(), "n": item.n}
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            change_line("tokens", 1),
            r"lines\[0\] \(dev-a boot 1 api_calls\): tokens is b'9', the evidence gives 8",
        ),
        (change_line("from_units", -1), "from_units is b'249', the evidence gives 250"),
        (change_line("to_units", 1), "to_units is b'1002'"),
        (lambda doc: doc["lines"][0].update({"price": "0.02"}), "price is"),
        (lambda doc: doc["lines"][0].update({"tokens": True}), "tokens is b'true'"),
        (lambda doc: doc["lines"].pop(), r"lines\[3\] \(dev-a boot 2 frames\) is missing"),
        (lambda doc: doc["lines"].append(doc["lines"][0]), r"lines\[4\] is not backed"),
        (lambda doc: doc["totals"]["devices"].update({"dev-a": 16}), "totals.devices.dev-a"),
        (lambda doc: doc["totals"].update({"account": 18}), "totals.account is not the sum"),
        (
            swap_boundaries,
            "end report's hour .* is not in the window|start report n 9 is not before",
        ),
        (
            lambda doc: doc["epochs"][0]["start"].update({"n": 9}),
            "start report n 9 is not before end n 9",
        ),
        (
            lambda doc: doc["epochs"][0].update({"boot": 0}),
            "signed body is 'dev-a' boot 1 n 9, not 'dev-a' boot 0 n 9",
        ),
        (
            lambda doc: doc["epochs"][0]["end"].update({"envelope": "c0"}),
            "end report: envelope does not decode",
        ),
        (
            envelope_of(report("dev-a", 1, 9, 2, {"api_calls": 1001}, STRANGER)),
            "signature does not verify",
        ),
        (envelope_of(report("dev-a", 1, 10, 2, {"api_calls": 1})), "api_calls decreases from 250"),
        (lambda doc: doc["epochs"][0]["end"].update({"hour_ms": T0 + 3 * H}), "not in the window"),
        (
            lambda doc: doc["epochs"][0]["end"].update({"hour": "2026-11-18T12:00:00.000Z"}),
            "epochs is not",
        ),
        (lambda doc: doc.update({"since": "2026-11-18T10:00:00.000Z"}), "since is not what"),
        (lambda doc: doc.update({"since_ms": T0 + 1}), "since_ms must be a whole UTC hour"),
        (lambda doc: doc["epochs"].reverse(), "not sorted"),
        (lambda doc: doc["device_keys"].pop("dev-a"), "device 'dev-a' has no key"),
        (lambda doc: doc.update({"format": "tokenwell-statement/2"}), "format"),
        (lambda doc: doc.update({"extra": 1}), "keys extra wrong"),
    ],
)
def test_resigned_changes_fail_with_a_precise_message(
    change: Callable[[dict[str, Any]], object], message: str
) -> None:
    with pytest.raises(StatementError, match=message):
        verify_statement(tamper(EXAMPLE, change))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            json.dumps(json.loads(EXAMPLE), indent=1, sort_keys=True).encode() + b"\n",
            "not the canonical",
        ),
        (EXAMPLE[:-1], "not the canonical"),
        (EXAMPLE + b"\n", "not the canonical"),
        (
            EXAMPLE.replace(b'"account":"acme"', b'"account":"acmf"'),
            "gateway's signature does not verify",
        ),
        (
            EXAMPLE.replace(b'"totals":{"account":17', b'"totals":{"account":17.0'),
            "not a JSON statement",
        ),
        ("{}\n".encode("utf-16"), "not a JSON statement"),
    ],
)
def test_bytes_that_are_not_the_signed_canonical_document_fail(data: bytes, message: str) -> None:
    with pytest.raises(StatementError, match=message):
        verify_statement(data)


# --- pinned keys ----------------------------------------------------------------------------


def test_pinned_keys_must_match() -> None:
    assert (
        verify_statement(EXAMPLE, gateway_public_key=raw(GATEWAY), device_keys=PUBLIC).total == 17
    )
    with pytest.raises(StatementError, match="is not the pinned"):
        verify_statement(EXAMPLE, gateway_public_key=raw(STRANGER))
    with pytest.raises(StatementError, match=r"device 'dev-b': key .* is not the pinned one"):
        verify_statement(EXAMPLE, device_keys={**PUBLIC, "dev-b": raw(STRANGER)})
    with pytest.raises(StatementError, match="device 'dev-c' has no pinned key"):
        verify_statement(EXAMPLE, device_keys={"dev-a": PUBLIC["dev-a"], "dev-b": PUBLIC["dev-b"]})


def test_a_statement_signed_by_another_gateway_only_verifies_unpinned() -> None:
    """Without a pin, a statement proves only its own key: pin the gateway's key."""
    doc = json.loads(EXAMPLE)
    doc["gateway_public_key"] = raw(STRANGER).hex()
    forged = resign(doc, STRANGER)
    assert verify_statement(forged).total == 17
    with pytest.raises(StatementError, match="not the pinned"):
        verify_statement(forged, gateway_public_key=raw(GATEWAY))
    with pytest.raises(StatementError, match="gateway's signature does not verify"):
        verify_statement(resign(json.loads(EXAMPLE), STRANGER))


def test_a_device_key_swapped_for_a_forgers_fails_against_the_pin() -> None:
    """A gateway listing its own key for a device, with reports it signed, is caught by pins."""
    forged = [report("dev-a", 1, 1, 0, {"api_calls": 10**6}, STRANGER)]
    data = build(forged, public_keys={**PUBLIC, "dev-a": raw(STRANGER)})
    assert verify_statement(data).total == 10**4
    with pytest.raises(StatementError, match="dev-a"):
        verify_statement(data, device_keys=PUBLIC)

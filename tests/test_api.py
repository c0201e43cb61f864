"""The admin web service over real HTTP: auth, errors, idempotency, OpenAPI, metrics."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import GatewayHandle, Listener, RawDevice, running_gateway


@pytest.fixture
async def gw(shared_broker: Any, tmp_path: Path) -> AsyncIterator[GatewayHandle]:
    async with running_gateway(shared_broker.url, tmp_path) as handle:
        yield handle


def key_hex(device: RawDevice) -> str:
    return device.key.public_key().public_bytes_raw().hex()


async def test_every_v1_call_needs_the_bearer_token(gw: GatewayHandle) -> None:
    base = str(gw.api.base_url)
    async with httpx.AsyncClient(base_url=base) as anonymous:
        for method, path in [("GET", "/v1/devices"), ("GET", "/v1/gateway"), ("GET", "/v1/usage"),
                             ("POST", "/v1/devices"), ("DELETE", "/v1/devices/x")]:  # fmt: skip
            reply = await anonymous.request(method, path)
            assert reply.status_code == 401, (method, path)
            assert reply.json()["error"] == "unauthorized"
        wrong = await anonymous.get("/v1/devices", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert (await anonymous.get("/healthz")).status_code == 200
        assert (await anonymous.get("/openapi.json")).status_code == 200


async def test_provision_show_list_and_conflict(gw: GatewayHandle) -> None:
    device = RawDevice("api-1")
    created = await gw.add_device(device.id, device.key, 250, account="acme")
    fields = ("device", "account", "state", "balance", "allocation", "used")
    assert tuple(created[k] for k in fields) == ("api-1", "acme", "ok", 250, 250, 0)
    assert (await gw.device("api-1"))["public_key"] == key_hex(device)
    listed = (await gw.api.get("/v1/devices")).json()
    assert [d["device"] for d in listed] == ["api-1"]
    again = await gw.api.post(
        "/v1/devices", json={"id": "api-1", "public_key": key_hex(device), "tokens": 1}
    )
    assert (again.status_code, again.json()["error"]) == (409, "conflict")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"id": "bad id!", "public_key": "00" * 32, "tokens": 1}, "id"),
        ({"id": "ok", "public_key": "zz", "tokens": 1}, "public_key"),
        ({"id": "ok", "public_key": "00" * 31, "tokens": 1}, "public_key"),
        # Well-formed but small-order points: signatures with them prove nothing.
        ({"id": "ok", "public_key": "01" + "00" * 31, "tokens": 1}, "not a usable Ed25519 key"),
        ({"id": "ok", "public_key": "00" * 32, "tokens": 1}, "not a usable Ed25519 key"),
        ({"id": "ok", "public_key": "00" * 32, "tokens": -1}, "tokens"),
        ({"id": "ok", "public_key": "00" * 32, "tokens": "10"}, "tokens"),
        ({"id": "ok", "public_key": "00" * 32, "tokens": 1.5}, "tokens"),
        ({"id": "ok", "public_key": "00" * 32, "tokens": 2**70}, "tokens"),
        ({"id": "ok", "public_key": "00" * 32}, "tokens"),
        ({"id": "x" * 65, "public_key": "00" * 32, "tokens": 1}, "id"),
    ],
)
async def test_invalid_provisioning_is_a_422_and_applies_nothing(
    gw: GatewayHandle, body: dict[str, Any], fragment: str
) -> None:
    reply = await gw.api.post("/v1/devices", json=body)
    assert reply.status_code == 422
    assert reply.json()["error"] == "invalid"
    assert fragment in reply.json()["detail"]
    assert (await gw.api.get("/v1/devices")).json() == []


async def test_refill_with_an_idempotency_key_credits_once(gw: GatewayHandle) -> None:
    device = RawDevice("idem-1")
    await gw.add_device(device.id, device.key, 10)
    headers = {"Idempotency-Key": "refill-42"}
    first = await gw.api.post("/v1/devices/idem-1/refill", json={"tokens": 90}, headers=headers)
    retry = await gw.api.post("/v1/devices/idem-1/refill", json={"tokens": 90}, headers=headers)
    assert (first.json()["replayed"], retry.json()["replayed"]) == (False, True)
    assert retry.json()["allocation"] == 100
    other = await gw.api.post("/v1/devices/idem-1/refill", json={"tokens": 5}, headers=headers)
    assert other.status_code == 409
    plain = await gw.api.post("/v1/devices/idem-1/refill", json={"tokens": 5})
    assert plain.json()["allocation"] == 105
    granted, _ = await gw.service.ledger.totals("idem-1")
    assert granted == 105


async def test_errors_for_unknown_and_revoked_devices(gw: GatewayHandle) -> None:
    missing = await gw.api.post("/v1/devices/ghost/refill", json={"tokens": 5})
    assert (missing.status_code, missing.json()["error"]) == (404, "not_found")
    assert (await gw.api.get("/v1/devices/ghost")).status_code == 404
    assert (await gw.api.delete("/v1/devices/ghost")).status_code == 404
    device = RawDevice("gone-1")
    await gw.add_device(device.id, device.key, 10)
    assert (await gw.api.delete("/v1/devices/gone-1")).json()["state"] == "revoked"
    assert (await gw.api.delete("/v1/devices/gone-1")).status_code == 200  # idempotent
    refused = await gw.api.post("/v1/devices/gone-1/refill", json={"tokens": 5})
    assert refused.status_code == 409
    assert (await gw.api.post("/v1/devices/gone-1/refill", json={"tokens": 0})).status_code == 422


async def test_usage_by_device_meter_and_hour(gw: GatewayHandle, shared_broker: Any) -> None:
    device = RawDevice("usage-1")
    await gw.add_device(device.id, device.key, 10_000)
    three_hours_ago = time.time_ns() // 1_000_000 - 3 * 3_600_000
    hour = three_hours_ago - three_hours_ago % 3_600_000  # device clocks within the plausible past
    async with Listener.connect(shared_broker.url) as publisher:
        for minutes, calls in [(5, 1000), (50, 3000), (65, 3500)]:
            publisher.publish(
                gw.topics.usage(device.id),
                device.report(
                    {"api_calls": calls, "gpu_seconds": minutes}, t=hour + minutes * 60_000
                ),
            )
        await gw.wait_committed(lambda: gw.service.processed >= 3)
    reply = await gw.api.get(
        "/v1/usage", params={"device": "usage-1", "meter": "api_calls", "bucket": "hour"}
    )
    rows = reply.json()["rows"]
    assert [(r["units"], r["tokens"]) for r in rows] == [(3000, 30), (500, 5)]
    assert rows[0]["bucket"].endswith(":00:00.000Z")
    until = await gw.api.get(
        "/v1/usage", params={"device": "usage-1", "until": str(hour + 3_600_000)}
    )
    assert until.json()["total_tokens"] == 30 + 17  # api_calls 30, gpu_seconds ceil(50/3)
    bad = await gw.api.get("/v1/usage", params={"since": "yesterday"})
    assert (bad.status_code, bad.json()["error"]) == (422, "invalid")


async def test_gateway_key_metrics_health_and_openapi(gw: GatewayHandle) -> None:
    info = (await gw.api.get("/v1/gateway")).json()
    assert len(bytes.fromhex(info["public_key"])) == 32
    assert info["version"]
    assert (await gw.api.get("/healthz")).json()["status"] == "ok"
    metrics = (await gw.api.get("/metrics")).text
    assert "# TYPE tokenwell_reports_total counter" in metrics
    assert "tokenwell_devices 0.0" in metrics  # a fresh gateway, nothing provisioned
    spec = (await gw.api.get("/openapi.json")).json()
    assert {"/v1/devices", "/v1/devices/{device_id}", "/v1/devices/{device_id}/refill", "/v1/usage",
            "/v1/gateway", "/healthz", "/metrics"} <= set(spec["paths"])  # fmt: skip

"""Token economics end to end: shared pools, overage and pay-as-you-go devices, alerts and
top-ups, through a real Mosquitto, a real SQLite ledger and the admin API over HTTP."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from gateway import views
from tests.helpers import GatewayHandle, Listener, RawDevice, assert_conserved, running_gateway
from tests.test_cli import run_cli


@pytest.fixture
async def gw(shared_broker: Any, tmp_path: Path) -> Any:
    async with running_gateway(shared_broker.url, tmp_path) as handle:
        yield handle


async def put_pool(gw: GatewayHandle, path: str, body: dict[str, Any]) -> dict[str, Any]:
    reply = await gw.api.put(path, json=body)
    assert reply.status_code == 200, reply.text
    result: dict[str, Any] = reply.json()
    return result


async def test_a_shared_pool_blocks_its_devices_together_and_one_grant_releases_them_all(
    gw: GatewayHandle, shared_broker: Any
) -> None:
    topics = gw.topics
    devices = [RawDevice(f"pool-{i}") for i in range(3)]
    async with Listener.connect(shared_broker.url, topics.all_events, *(
        topics.control(d.id) for d in devices
    )) as listen:  # fmt: skip
        await put_pool(gw, "/v1/accounts/acme/pool", {"policy": "prepaid"})
        granted = await gw.api.post("/v1/accounts/acme/grants", json={"tokens": 100})
        assert (granted.status_code, granted.json()["balance"]) == (200, 100)
        for device in devices:
            state = await gw.add_device(device.id, device.key, 0, account="acme", pool="shared")
            assert (state["pool"], state["balance"], state["allocation"]) == ("shared", 100, 100)

        for device in devices:  # 40 tokens each: 120 of 100
            listen.publish(topics.usage(device.id), device.report({"api_calls": 4_000}))
        for device in devices:
            blocked = await listen.wait_control(
                topics, device.id, gw.key, lambda c: c.state == "block"
            )
            assert (blocked.balance, blocked.why) == (-20, "exhausted")

        reply = await gw.api.post("/v1/accounts/acme/grants", json={"tokens": 100})
        assert reply.json()["balance"] == 80  # the 20 tokens of debt are paid first
        for device in devices:
            resumed = await listen.wait_control(
                topics, device.id, gw.key, lambda c: c.state == "ok" and c.balance == 80
            )
            assert resumed.why == "refill"
        pool = (await gw.api.get("/v1/accounts/acme/pool")).json()
        assert (pool["allocation"], pool["used"], pool["devices"]) == (
            200, 120, [d.id for d in devices],
        )  # fmt: skip
        assert [(await gw.device(d.id))["used"] for d in devices] == [40, 40, 40]
    await assert_conserved(gw.service.ledger)


async def test_a_per_device_cap_binds_before_the_shared_pool(
    gw: GatewayHandle, shared_broker: Any
) -> None:
    topics = gw.topics
    capped, free = RawDevice("capped"), RawDevice("uncapped")
    async with Listener.connect(
        shared_broker.url, topics.control(capped.id), topics.control(free.id)
    ) as listen:
        await put_pool(gw, "/v1/accounts/shop/pool", {})
        await gw.api.post("/v1/accounts/shop/grants", json={"tokens": 1000})
        await gw.add_device(capped.id, capped.key, 0, account="shop", pool="shared", cap=30)
        await gw.add_device(free.id, free.key, 0, account="shop", pool="shared")
        listen.publish(topics.usage(capped.id), capped.report({"api_calls": 3_000}))
        blocked = await listen.wait_control(topics, capped.id, gw.key, lambda c: c.state == "block")
        assert (blocked.why, blocked.balance) == ("cap_reached", 0)
        listen.publish(topics.usage(free.id), free.report({"api_calls": 3_000}))
        await gw.wait_committed(lambda: gw.service.registry.devices[free.id].used == 30)
        assert (await gw.device(free.id))["state"] == "ok"
        assert (await gw.device(free.id))["balance"] == 940


async def test_an_overage_device_runs_to_its_cap_then_is_blocked_and_overage_is_recorded(
    gw: GatewayHandle, shared_broker: Any
) -> None:
    topics = gw.topics
    device = RawDevice("over-1")
    allocation = {"policy": "overage", "overage_cap": 50}
    async with Listener.connect(shared_broker.url, topics.control(device.id)) as listen:
        await gw.add_device(device.id, device.key, 100, allocation=allocation)
        listen.publish(topics.usage(device.id), device.report({"api_calls": 10_000}))  # 100
        await gw.wait_committed(lambda: gw.service.registry.pools[device.id].used == 100)
        assert (await gw.device(device.id))["state"] == "ok"  # 50 of 150 left: not even low
        listen.publish(topics.usage(device.id), device.report({"api_calls": 14_000}))  # 140
        low = await listen.wait_control(topics, device.id, gw.key, lambda c: c.seq == 2)
        assert (low.state, low.balance) == ("throttle", -40)  # 10 of 150 left
        listen.publish(topics.usage(device.id), device.report({"api_calls": 15_000}))  # 150
        blocked = await listen.wait_control(topics, device.id, gw.key, lambda c: c.seq == 3)
        assert (blocked.state, blocked.balance, blocked.why) == ("block", -50, "overage_cap")
    state = await gw.device(device.id)
    assert (state["policy"], state["overage"], state["balance"]) == ("overage", 50, -50)
    snapshot = await assert_conserved(gw.service.ledger)
    with sqlite3.connect(gw.service.ledger.path) as raw:  # each debit line keeps its overage
        booked = raw.execute("SELECT SUM(overage) FROM debits WHERE pool = ?", (device.id,))
        assert booked.fetchone() == (50,)
    usage = (await gw.api.get("/v1/usage", params={"device": device.id})).json()
    assert (usage["total_tokens"], usage["total_overage"]) == (150, 50)  # billed apart
    assert [p.overage for p in snapshot.pools if p.key == device.id] == [50]


async def test_a_pay_as_you_go_device_is_never_blocked(
    gw: GatewayHandle, shared_broker: Any
) -> None:
    topics = gw.topics
    device = RawDevice("payg-1")
    async with Listener.connect(shared_broker.url, topics.control(device.id)) as listen:
        await gw.add_device(device.id, device.key, 0, allocation={"policy": "payg"})
        first = await listen.wait_control(topics, device.id, gw.key, lambda c: c.seq == 1)
        assert first.state == "ok"
        for count in (10**6, 10**8, 10**10):
            listen.publish(topics.usage(device.id), device.report({"api_calls": count}))
        await gw.wait_committed(lambda: gw.service.registry.pools[device.id].used == 10**8)
    state = await gw.device(device.id)
    assert (state["state"], state["rate_permille"], state["control_seq"]) == ("ok", 1000, 1)
    assert (state["balance"], state["overage"]) == (-(10**8), 10**8)


async def test_thresholds_fire_once_and_a_top_up_is_granted_once_per_crossing(
    gw: GatewayHandle, shared_broker: Any
) -> None:
    topics = gw.topics
    device = RawDevice("alert-1")
    allocation = {"thresholds": ["50%", "80%"], "topup": {"floor": 10, "tokens": 100}}
    async with Listener.connect(shared_broker.url, topics.all_events) as listen:
        await gw.add_device(device.id, device.key, 100, allocation=allocation)
        pools = gw.service.registry.pools
        for count in (5_500, 5_600, 9_500, 9_500, 9_600):  # 55, 56, 95 (twice), 96 tokens
            listen.publish(topics.usage(device.id), device.report({"api_calls": count}))
            await gw.wait_committed(lambda c=count: pools[device.id].used == c // 100)
        await listen.wait_for(lambda m: m.topic == topics.event("topup"))
        events = [json.loads(m.payload) for m in listen.messages]
    thresholds = [e["threshold"] for e in events if e["type"] == "threshold"]
    assert thresholds == ["50%", "80%"]
    topups = [e for e in events if e["type"] == "topup"]
    assert [(e["tokens"], e["balance"], e["device"]) for e in topups] == [(100, 105, device.id)]
    pool = (await gw.api.get(f"/v1/devices/{device.id}/allocation")).json()
    assert (pool["allocation"], pool["balance"], pool["fired"]) == (200, 104, ["50%", "80%"])
    assert [(g["kind"], g["remaining"]) for g in pool["grants"]] == [("initial", 4), ("topup", 100)]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "fragment"),
    [
        ("PUT", "/v1/accounts/a/pool", {"policy": "prepaid", "overage_cap": 5}, 422, "overage"),
        ("PUT", "/v1/accounts/a/pool", {"policy": "free"}, 422, "policy"),
        ("PUT", "/v1/accounts/a/pool", {"thresholds": ["150%"]}, 422, "thresholds"),
        ("PUT", "/v1/accounts/a/pool", {"period": {"unit": "year", "anchor": "2026-01-01",
                                                    "tokens": 1}}, 422, "unit"),
        ("PUT", "/v1/accounts/a/pool", {"colour": "red"}, 422, "colour"),
        ("POST", "/v1/accounts/nobody/grants", {"tokens": 5}, 404, "shared pool"),
        ("POST", "/v1/accounts/a/grants", {"tokens": 0}, 422, "tokens"),
        ("GET", "/v1/accounts/nobody/pool", None, 404, "shared pool"),
        ("GET", "/v1/devices/nobody/allocation", None, 404, "nobody"),
    ],
)  # fmt: skip
async def test_bad_economics_requests_are_clear_4xx_and_change_nothing(
    gw: GatewayHandle, method: str, path: str, body: Any, status: int, fragment: str
) -> None:
    reply = await gw.api.request(method, path, json=body)
    assert reply.status_code == status, reply.text
    assert fragment in reply.json()["detail"]
    assert gw.service.registry.pools == {}


async def test_device_pool_choices_are_checked(gw: GatewayHandle) -> None:
    device = RawDevice("choice-1")
    body = {"id": device.id, "public_key": device.key.public_key().public_bytes_raw().hex()}
    no_pool = await gw.api.post("/v1/devices", json={**body, "tokens": 0, "pool": "shared"})
    assert (no_pool.status_code, no_pool.json()["error"]) == (404, "not_found")
    await put_pool(gw, f"/v1/accounts/{device.id}/pool", {})
    with_tokens = await gw.api.post("/v1/devices", json={**body, "tokens": 5, "pool": "shared"})
    assert with_tokens.status_code == 422
    cap_alone = await gw.api.post("/v1/devices", json={**body, "tokens": 5, "cap": 3})
    assert cap_alone.status_code == 422
    assert device.id not in gw.service.registry.devices
    await gw.add_device(device.id, device.key, 0, pool="shared")
    own = await gw.api.put(f"/v1/devices/{device.id}/allocation", json={})
    assert (own.status_code, own.json()["error"]) == (409, "conflict")


async def test_a_grant_with_a_key_credits_once_and_expiry_and_priority_are_kept(
    gw: GatewayHandle,
) -> None:
    device = RawDevice("grant-1")
    await gw.add_device(device.id, device.key, 10)
    body = {"tokens": 7, "priority": 5, "expires_at": "2099-01-01T00:00:00Z"}
    headers = {"Idempotency-Key": "g-1"}
    first = await gw.api.post(f"/v1/devices/{device.id}/grants", json=body, headers=headers)
    again = await gw.api.post(f"/v1/devices/{device.id}/grants", json=body, headers=headers)
    assert (first.json()["replayed"], again.json()["replayed"]) == (False, True)
    assert again.json()["balance"] == 17
    grants = [(g["kind"], g["remaining"], g["priority"], g["expires_at"])
              for g in again.json()["grants"]]  # fmt: skip
    assert grants == [("initial", 10, 0, None), ("grant", 7, 5, "2099-01-01T00:00:00.000Z")]
    other = await gw.api.post(
        f"/v1/devices/{device.id}/grants", json={**body, "tokens": 8}, headers=headers
    )
    assert other.status_code == 409
    past = await gw.api.post(
        f"/v1/devices/{device.id}/grants", json={"tokens": 1, "expires_at": "2001-01-01"}
    )
    assert (past.status_code, past.json()["error"]) == (422, "invalid")
    accounts = (await gw.api.get("/v1/accounts")).json()
    assert accounts == [{"account": device.id, "devices": [device.id], "shared_pool": False}]


async def test_a_statement_is_signed_verifies_offline_and_fails_on_any_change(
    gw: GatewayHandle, shared_broker: Any, tmp_path: Path
) -> None:
    """A pay-as-you-go device's usage appears in its account's statement; ``tokenwell
    verify`` recomputes it from the device-signed reports, and refuses an altered copy."""
    hour = 3_600_000
    now = time.time_ns() // 1_000_000
    start = now - now % hour - 3 * hour  # three whole hours ago
    payg, prepaid = RawDevice("st-payg"), RawDevice("st-pre")
    await gw.add_device(payg.id, payg.key, 0, account="stmt", allocation={"policy": "payg"})
    await gw.add_device(prepaid.id, prepaid.key, 10**6, account="stmt")
    async with Listener.connect(shared_broker.url) as publisher:
        for offset, count in ((10, 1_000), (70, 5_000), (125, 9_000)):  # minutes after start
            at = start + offset * 60_000  # a plausible device clock: attributed to it
            publisher.publish(gw.topics.usage(payg.id), payg.report({"api_calls": count}, t=at))
            await gw.wait_committed(lambda c=count: gw.service.registry.pools[payg.id].used
                                    == c // 100)  # fmt: skip
        publisher.publish(
            gw.topics.usage(prepaid.id), prepaid.report({"gpu_seconds": 7}, t=start + 80 * 60_000)
        )
        await gw.wait_committed(lambda: gw.service.registry.pools[prepaid.id].used == 3)

    window = {"since": views.rfc3339(start + hour), "until": views.rfc3339(start + 3 * hour)}
    reply = await gw.api.get("/v1/accounts/stmt/statement", params=window)
    assert reply.status_code == 200, reply.text
    document = json.loads(reply.content)
    lines = {(line["device"], line["meter"]): line for line in document["lines"]}
    assert (lines["st-payg", "api_calls"]["from_units"], lines["st-payg", "api_calls"]["to_units"],
            lines["st-payg", "api_calls"]["tokens"]) == (1_000, 9_000, 80)  # fmt: skip
    assert lines["st-pre", "gpu_seconds"]["tokens"] == 3
    assert document["totals"] == {"account": 83, "devices": {"st-payg": 80, "st-pre": 3}}

    path = tmp_path / "statement.json"
    path.write_bytes(reply.content)
    pins = tmp_path / "keys.json"
    pins.write_text(json.dumps({d.id: d.key.public_key().public_bytes_raw().hex()
                                for d in (payg, prepaid)}))  # fmt: skip
    gateway_key = (await gw.api.get("/v1/gateway")).json()["public_key"]
    ok = await run_cli("verify", str(path), "--gateway-key", gateway_key,
                       "--device-keys", str(pins))  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "verified: account stmt" in ok.stdout
    assert "83 tokens" in ok.stdout

    altered = reply.content.replace(b'"tokens":80', b'"tokens":70')
    assert altered != reply.content
    path.write_bytes(altered)
    refused = await run_cli("verify", str(path))
    assert refused.returncode == 1
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "Traceback" not in refused.stderr

    fetched = await run_cli("statement", "stmt", "--since", window["since"], "--until",
                            window["until"], "-o", str(path), api=str(gw.api.base_url))  # fmt: skip
    assert fetched.returncode == 0, fetched.stderr
    assert (await run_cli("verify", str(path))).returncode == 0

    odd = await gw.api.get("/v1/accounts/stmt/statement",
                           params={**window, "since": views.rfc3339(start + 1)})  # fmt: skip
    assert (odd.status_code, odd.json()["error"]) == (422, "invalid")
    missing = await gw.api.get("/v1/accounts/nobody/statement", params=window)
    assert missing.status_code == 404

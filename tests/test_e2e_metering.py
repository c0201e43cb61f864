"""End to end through a real Mosquitto and a real SQLite ledger: the metering loop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gateway.pricing import charged, parse_price
from tests.helpers import Listener, RawDevice, running_gateway


def fleet_state(listener: Listener, topic: str) -> Any:
    async def wait(predicate: Any) -> dict[str, Any]:
        message = await listener.wait_for(
            lambda m: m.topic == topic and predicate(json.loads(m.payload))
        )
        result: dict[str, Any] = json.loads(message.payload)
        return result

    return wait


async def test_exhausted_device_is_blocked_and_a_refill_resumes_it(
    broker: Any, tmp_path: Path
) -> None:
    """Throttle at 20 %, block at zero, ok again after a refill: all as signed control messages."""
    async with running_gateway(broker.url, tmp_path) as gw:
        device = RawDevice("meter-1")
        topics = gw.topics
        async with Listener.connect(
            broker.url, topics.control(device.id), topics.all_events
        ) as listen:
            await gw.add_device(device.id, device.key, 100)
            first = await listen.wait_control(topics, device.id, gw.key, lambda c: c.seq == 1)
            assert (first.state, first.rate_permille, first.why) == ("ok", 1000, "provisioned")

            listen.publish(
                topics.usage(device.id), device.report({"api_calls": 8_100})
            )  # 81 tokens
            low = await listen.wait_control(topics, device.id, gw.key, lambda c: c.seq == 2)
            assert (low.state, low.rate_permille, low.balance, low.why) == (
                "throttle",
                500,
                19,
                "low_balance",
            )

            listen.publish(topics.usage(device.id), device.report({"api_calls": 10_000}))
            blocked = await listen.wait_control(topics, device.id, gw.key, lambda c: c.seq == 3)
            assert (blocked.state, blocked.rate_permille, blocked.balance) == ("block", 0, 0)

            reply = await gw.api.post(f"/v1/devices/{device.id}/refill", json={"tokens": 50})
            assert reply.status_code == 200
            resumed = await listen.wait_control(topics, device.id, gw.key, lambda c: c.seq == 4)
            assert (resumed.state, resumed.rate_permille, resumed.balance, resumed.why) == (
                "ok", 1000, 50, "refill",
            )  # fmt: skip
            await listen.wait_for(lambda m: m.topic == topics.event("resume"))
            kinds = {
                json.loads(m.payload)["type"]
                for m in listen.messages
                if "/fleet/events/" in m.topic
            }
            assert {"device_added", "throttle", "block", "refill", "resume"} <= kinds


async def test_duplicates_replays_and_late_reports_charge_exactly_once(
    broker: Any, tmp_path: Path
) -> None:
    """A stream full of duplicates, replays and reorders costs exactly charged(final counters)."""
    async with running_gateway(broker.url, tmp_path) as gw:
        device = RawDevice("dup-1")
        await gw.add_device(device.id, device.key, 1_000_000)
        counts = [(100, 3), (250, 7), (250, 7), (600, 10), (400, 9), (1000, 20)]
        envelopes = [device.report({"api_calls": a, "gpu_seconds": g}) for a, g in counts]
        stream = [*envelopes, envelopes[1], envelopes[0], envelopes[-1], envelopes[3]]
        old_epoch = device.report({"api_calls": 50}, boot=0)  # a late report of an earlier epoch
        async with Listener.connect(broker.url) as publisher:
            for payload in [*stream, old_epoch]:
                publisher.publish(gw.topics.usage(device.id), payload)
            await gw.wait_committed(lambda: gw.service.processed >= 11)
        expected = (
            charged(1000, parse_price("0.01")) + charged(20, parse_price("1/3"))
            + charged(50, parse_price("0.01"))
        )  # fmt: skip
        state = await gw.device(device.id)
        assert state["used"] == expected
        assert state["balance"] == 1_000_000 - expected
        granted, debited = await gw.service.ledger.totals(device.id)
        assert (granted - debited, debited) == (state["balance"], state["used"])


async def test_bad_reports_are_rejected_with_events_and_debit_nothing(
    broker: Any, tmp_path: Path
) -> None:
    async with running_gateway(broker.url, tmp_path) as gw:
        device, stranger = RawDevice("victim-1"), RawDevice("stranger-1")
        await gw.add_device(device.id, device.key, 1000)
        forged = bytearray(device.report({"api_calls": 5000}))
        forged[-1] ^= 0x01
        bad = {
            "malformed": b"\x00not msgpack",
            "bad_signature": bytes(forged),
            "unknown_device": stranger.report({"api_calls": 1}),
        }
        async with Listener.connect(broker.url, gw.topics.event("rejected")) as listen:
            listen.publish(gw.topics.usage(device.id), bad["malformed"])
            listen.publish(gw.topics.usage(device.id), bad["bad_signature"])
            listen.publish(gw.topics.usage(stranger.id), bad["unknown_device"])
            listen.publish(gw.topics.usage(device.id), stranger.report({"api_calls": 9}))
            for reason in ("malformed", "bad_signature", "unknown_device"):
                await listen.wait_for(lambda m, r=reason: json.loads(m.payload)["reason"] == r)
        assert (await gw.device(device.id))["used"] == 0
        metrics = (await gw.api.get("/metrics")).text
        assert 'tokenwell_rejected_reports_total{reason="bad_signature"} 2.0' in metrics
        assert 'tokenwell_rejected_reports_total{reason="malformed"} 1.0' in metrics


async def test_fleet_state_topic_follows_every_change(broker: Any, tmp_path: Path) -> None:
    async with running_gateway(broker.url, tmp_path) as gw:
        device = RawDevice("fleet-1")
        topic = gw.topics.fleet_device(device.id)
        async with Listener.connect(broker.url, topic) as listen:
            await gw.add_device(device.id, device.key, 500, account="acme")
            wait = fleet_state(listen, topic)
            state = await wait(lambda s: s["used"] == 0)
            assert (state["account"], state["state"], state["allocation"]) == ("acme", "ok", 500)
            listen.publish(gw.topics.usage(device.id), device.report({"api_calls": 30_000}))
            state = await wait(lambda s: s["used"] == 300)
            assert (state["balance"], state["state"], state["last_report_at"] is not None) == (
                200,
                "ok",
                True,
            )


async def test_revoked_device_is_blocked_and_its_reports_rejected(
    broker: Any, tmp_path: Path
) -> None:
    async with running_gateway(broker.url, tmp_path) as gw:
        device = RawDevice("revoke-1")
        topics = gw.topics
        async with Listener.connect(
            broker.url, topics.control(device.id), topics.event("rejected")
        ) as listen:
            await gw.add_device(device.id, device.key, 1000)
            assert (await gw.api.delete(f"/v1/devices/{device.id}")).status_code == 200
            control = await listen.wait_control(
                topics, device.id, gw.key, lambda c: c.state == "block"
            )
            assert control.why == "revoked"
            listen.publish(topics.usage(device.id), device.report({"api_calls": 100}))
            await listen.wait_for(
                lambda m: (
                    m.topic == topics.event("rejected")
                    and json.loads(m.payload)["reason"] == "revoked_device"
                )
            )
        assert (await gw.device(device.id))["used"] == 0


async def test_reports_sent_while_the_gateway_is_down_are_charged_once(
    broker: Any, tmp_path: Path
) -> None:
    """The persistent session queues reports for a stopped gateway; they are charged on return."""
    client_id, prefix = "gw-persistent", "persist/v1"
    device = RawDevice("offline-1")
    async with running_gateway(broker.url, tmp_path, prefix=prefix, client_id=client_id) as gw:
        await gw.add_device(device.id, device.key, 10_000)
        topics = gw.topics
    async with Listener.connect(broker.url) as publisher:
        for count in range(100, 2100, 100):
            publisher.publish(topics.usage(device.id), device.report({"api_calls": count}))
        publisher.publish(topics.usage(device.id), device.report({"api_calls": 2000}))
    async with running_gateway(broker.url, tmp_path, prefix=prefix, client_id=client_id) as gw:
        await gw.wait_committed(lambda: gw.service.registry.devices[device.id].used == 20)
        assert gw.service.processed == 21
        assert (await gw.device(device.id))["balance"] == 10_000 - 20

"""Hostile and broken reports through the real broker and gateway: each is rejected with its
reason code, counted in /metrics, published as an event, and debits nothing."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.wire import UsageReport, sign_usage
from tests import hostile_corpus
from tests.helpers import Listener, running_gateway
from tests.hostile_corpus import REVOKED, VICTIM


def test_the_corpus_has_over_forty_distinct_bad_reports() -> None:
    keys = [Ed25519PrivateKey.generate() for _ in range(3)]
    corpus = hostile_corpus.build(*keys)
    assert len(corpus) >= 40
    assert len({name for name, *_ in corpus}) == len(corpus)
    assert len({(device, payload) for _, device, payload, _ in corpus}) == len(corpus)
    assert len({reason for *_, reason in corpus}) >= 14


async def test_every_hostile_report_is_rejected_counted_and_published(
    broker: Any, tmp_path: Path
) -> None:
    victim, revoked, stranger = (Ed25519PrivateKey.generate() for _ in range(3))
    corpus = hostile_corpus.build(victim, revoked, stranger)
    async with running_gateway(broker.url, tmp_path) as gw:
        topics = gw.topics
        await gw.add_device(VICTIM, victim, 1000)
        await gw.add_device(REVOKED, revoked, 1000)
        assert (await gw.api.delete(f"/v1/devices/{REVOKED}")).status_code == 200
        async with Listener.connect(broker.url, topics.event("rejected")) as listen:
            for _, device, payload, _ in corpus:
                listen.publish(topics.usage(device), payload)
            good = sign_usage(
                UsageReport(VICTIM, 1, 99, hostile_corpus.T, {"api_calls": 250}), victim
            )
            listen.publish(topics.usage(VICTIM), good)  # the gateway keeps working
            await gw.wait_committed(lambda: gw.service.registry.devices[VICTIM].used == 3)
            await listen.wait_for(lambda m: len(listen.messages) >= len(corpus))
        events = [json.loads(m.payload) for m in listen.messages]
        for (name, device, _, reason), event in zip(corpus, events, strict=True):
            assert (event["reason"], event["device"]) == (reason.value, device[:64]), name
        metrics = (await gw.api.get("/metrics")).text
        for reason, count in Counter(reason for *_, reason in corpus).items():
            line = f'tokenwell_rejected_reports_total{{reason="{reason.value}"}} {float(count)}'
            assert line in metrics
        granted, debited = await gw.service.ledger.totals(VICTIM)
        assert (granted, debited) == (1000, 3)  # only the one good report was charged

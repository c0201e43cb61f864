"""A stream of junk does not become an equal stream of operator events."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.config import DEFAULT_LADDER
from gateway.ingest import Pricing
from gateway.ledger import MemoryLedger
from gateway.mqtt import Incoming
from gateway.service import MAX_REJECTED_EVENTS, MeteringService
from gateway.topics import Topics
from gateway.views import Event


class RecordingPublisher:
    """A fake of the MQTT adapter: records what would be published."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.unconfirmed = 0

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        self.published.append((topic, payload))
        return len(self.published)

    def ack(self, message: Incoming) -> None:
        return None

    def add_key(self, device: str, public_key: bytes) -> None:
        return None


def service(clock: Any) -> tuple[MeteringService, RecordingPublisher]:
    metering = MeteringService(
        MemoryLedger(),
        Pricing({}, DEFAULT_LADDER),
        Topics("t/v1"),
        Ed25519PrivateKey.generate(),
        clock,
    )
    publisher = RecordingPublisher()
    metering.attach(publisher, publisher)
    return metering, publisher


def test_rejected_events_are_limited_per_second_and_the_rest_counted() -> None:
    metering, publisher = service(lambda: 0)
    for _ in range(MAX_REJECTED_EVENTS + 300):
        metering.publish_event(Event("rejected", "junk-1", 5_000, {"reason": "malformed"}))
    metering.publish_event(Event("block", "dev-1", 5_000))  # other events are never limited
    assert len(publisher.published) == MAX_REJECTED_EVENTS + 1
    metering.publish_event(Event("rejected", "junk-1", 6_000, {"reason": "malformed"}))
    assert len(publisher.published) == MAX_REJECTED_EVENTS + 2  # a new second
    text = metering.metrics.render().decode()
    assert "tokenwell_events_suppressed_total 300.0" in text
    assert f'tokenwell_events_total{{type="rejected"}} {MAX_REJECTED_EVENTS + 301}.0' in text

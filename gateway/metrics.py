"""Prometheus metrics of one gateway (a registry per gateway, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)  # seconds
STAGES = ("verify", "charge", "queued", "publish")  # tokenwell_stage_seconds's stages


class Metrics:
    """The gateway's counters; ``render()`` is the ``/metrics`` body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.reports = Counter(
            "tokenwell_reports", "Usage reports processed, by outcome", ["outcome"], registry=r
        )
        self.rejected = Counter(
            "tokenwell_rejected_reports",
            "Rejected usage reports, by reason",
            ["reason"],
            registry=r,
        )
        self.tokens_debited = Counter("tokenwell_tokens_debited", "Tokens debited", registry=r)
        self.tokens_granted = Counter("tokenwell_tokens_granted", "Tokens granted", registry=r)
        self.controls = Counter(
            "tokenwell_control_messages", "Control messages issued, by state", ["state"], registry=r
        )
        self.events = Counter("tokenwell_events", "Operator events, by type", ["type"], registry=r)
        self.batch_size = Histogram(
            "tokenwell_batch_size", "Reports per committed batch",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000), registry=r,
        )  # fmt: skip
        self.commit_seconds = Histogram(
            "tokenwell_commit_seconds", "Ledger commit duration",
            buckets=STAGE_BUCKETS, registry=r,
        )  # fmt: skip
        self.stage_seconds = Histogram(
            "tokenwell_stage_seconds",
            "Seconds in a stage of the pipeline: verify and charge (per batch), queued "
            "(per batch: charged, waiting for its commit to begin), publish (per commit: made "
            "visible, acknowledged, control messages and events out); the commit itself is "
            "tokenwell_commit_seconds",
            ["stage"], buckets=STAGE_BUCKETS, registry=r,
        )  # fmt: skip
        self.commit_failures = Counter(
            "tokenwell_commit_failures", "Ledger commits that failed and were retried", registry=r
        )
        self.events_suppressed = Counter(
            "tokenwell_events_suppressed",
            "Rejected events not published (over the per-second limit)",
            registry=r,
        )
        self.floods = Counter(
            "tokenwell_floods", "Times a device passed the per-device report rate", registry=r
        )
        self.vouched = Counter(
            "tokenwell_vouched_reports",
            "Reports whose signature the receiver process checked (the rest: the gateway)",
            registry=r,
        )
        self.receiver_restarts = Counter(
            "tokenwell_receiver_restarts", "Receiver processes started after one died", registry=r
        )
        self.devices = Gauge("tokenwell_devices", "Provisioned devices (not revoked)", registry=r)
        self.backlog = Gauge(
            "tokenwell_ingest_backlog", "Received reports not yet committed", registry=r
        )
        self.broker_connected = Gauge(
            "tokenwell_broker_connected", "1 when connected to the broker", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Topic names (contract §2) under a configurable prefix, ``tokens/v1`` by default."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Topics:
    """Builds and parses the topics under one prefix."""

    prefix: str = "tokens/v1"

    @property
    def all_usage(self) -> str:
        """The gateway's subscription: every device's usage topic."""
        return f"{self.prefix}/devices/+/usage"

    def usage(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/usage"

    def control(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/control"

    def fleet_device(self, device: str) -> str:
        return f"{self.prefix}/fleet/devices/{device}"

    @property
    def all_fleet_devices(self) -> str:
        return f"{self.prefix}/fleet/devices/+"

    def event(self, event_type: str) -> str:
        return f"{self.prefix}/fleet/events/{event_type}"

    @property
    def all_events(self) -> str:
        return f"{self.prefix}/fleet/events/+"

    def device_of_usage(self, topic: str) -> str | None:
        """The ``{id}`` level of a usage topic under this prefix, unvalidated; None if not one."""
        head = f"{self.prefix}/devices/"
        if not topic.startswith(head) or not topic.endswith("/usage"):
            return None
        return topic[len(head) : -len("/usage")]

"""What operators see (contract §6): device state and events as JSON, built purely."""

from __future__ import annotations

import datetime as dt
import functools
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.economics import Pool, format_share
from gateway.metering import Device, device_balance, used_now

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def rfc3339(ms: int | None) -> str | None:
    """``ms`` since the Unix epoch as RFC 3339 UTC with milliseconds (``...Z``); None stays None."""
    if ms is None:
        return None
    seconds, millis = divmod(ms, 1000)  # integer arithmetic: no float rounding
    return f"{_rfc3339_second(seconds)}.{millis:03d}Z"


@functools.lru_cache(maxsize=4096)
def _rfc3339_second(seconds: int) -> str:
    """``2026-11-28T10:00:00``: the fleet state formats the same few seconds again and
    again (twice a device state, thousands a second), so they are kept."""
    return (_EPOCH + dt.timedelta(seconds=seconds)).isoformat(timespec="seconds")[:-6]


def device_state(device: Device, pool: Pool) -> dict[str, Any]:
    """The fleet-state document of a device, also served by ``GET /v1/devices/{id}``.

    ``balance`` is what binds first (the pool's balance, or less under the device's cap);
    ``allocation`` is the pool's for the current period; ``used`` the device's own debits
    in that period; ``pool_used`` all of the pool's.
    """
    control = device.control
    return {
        "device": device.id,
        "account": device.account,
        "state": "revoked" if device.revoked else (control.state if control else "ok"),
        "rate_permille": control.rate_permille if control else 1000,
        "balance": device_balance(device, pool),
        "allocation": pool.allocation,
        "used": used_now(device, pool),
        "pool": "shared" if pool.shared else "dedicated",
        "policy": pool.policy,
        "cap": device.cap,
        "pool_balance": pool.balance,
        "pool_used": pool.used,
        "overage": pool.overage,
        "period_start": rfc3339(pool.period_start_ms) if pool.period else None,
        "period_end": rfc3339(pool.period_end_ms),
        "revoked": device.revoked,
        "public_key": device.public_key.hex(),
        "control_seq": control.seq if control else 0,
        "created_at": rfc3339(device.created_ms),
        "last_report_at": rfc3339(device.last_report_ms),
        "updated_at": rfc3339(device.updated_ms),
    }


@dataclass(frozen=True, slots=True)
class Event:
    """An operator event: ``type`` is the topic's last level, ``details`` extra JSON fields."""

    type: str
    device: str
    at_ms: int
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        body = {"type": self.type, "device": self.device, "at": rfc3339(self.at_ms)}
        return json.dumps({**body, **self.details}, separators=(",", ":")).encode()


def state_json(device: Device, pool: Pool) -> bytes:
    """:func:`device_state` encoded for the retained fleet topic: the very bytes of
    ``json.dumps(device_state(device, pool), separators=(",", ":"))``, built from a
    template in less than half the time (one is published for every changed device
    every half second; docs/performance.md)."""
    control = device.control
    state = "revoked" if device.revoked else (control.state if control else "ok")
    period = rfc3339(pool.period_start_ms) if pool.period else None
    kind = '"shared"' if pool.shared else '"dedicated"'
    return (
        f'{{"device":{_text(device.id)},"account":{_text(device.account)},'
        f'"state":{_text(state)},"rate_permille":{control.rate_permille if control else 1000},'
        f'"balance":{device_balance(device, pool)},"allocation":{pool.allocation},'
        f'"used":{used_now(device, pool)},'
        f'"pool":{kind},"policy":{_text(pool.policy)},'
        f'"cap":{_number(device.cap)},"pool_balance":{pool.balance},'
        f'"pool_used":{pool.used},"overage":{pool.overage},'
        f'"period_start":{_time(period)},"period_end":{_time(rfc3339(pool.period_end_ms))},'
        f'"revoked":{"true" if device.revoked else "false"},'
        f'"public_key":"{device.public_key.hex()}","control_seq":{control.seq if control else 0},'
        f'"created_at":{_time(rfc3339(device.created_ms))},'
        f'"last_report_at":{_time(rfc3339(device.last_report_ms))},'
        f'"updated_at":{_time(rfc3339(device.updated_ms))}}}'
    ).encode()


# json.dumps' own string encoder (C, ASCII with escapes, quotes included).
_text: Callable[[str], str] = json.encoder.encode_basestring_ascii


def _number(value: int | None) -> str:
    return "null" if value is None else str(value)


def _time(text: str | None) -> str:
    """An RFC 3339 time (digits, ``-``, ``:``, ``.``, ``T``, ``Z``: nothing to escape)."""
    return "null" if text is None else f'"{text}"'


def parse_time(text: str) -> int:
    """Parse RFC 3339 (``2026-11-28T10:00:00Z``), a date (``2026-11-28``, UTC midnight) or
    ms since the Unix epoch into ms; raises ValueError otherwise. Naive times are UTC."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    # Exact, rounding down: ``timestamp() * 1000`` goes through a float.
    return (moment - _EPOCH) // dt.timedelta(milliseconds=1)


def pool_view(pool: Pool, devices: Iterable[str]) -> dict[str, Any]:
    """A pool as the admin API shows it: settings, the current period's numbers, live
    grants in burn order, and the devices drawing from it."""
    period = pool.period
    topup = pool.topup
    return {
        "pool": "shared" if pool.shared else "dedicated",
        "account": pool.account,
        "device": None if pool.shared else pool.key,
        "policy": pool.policy,
        "overage_cap": pool.overage_cap,
        "period": None if period is None else {
            "unit": period.unit, "anchor": rfc3339(period.anchor_ms), "tokens": period.tokens,
            "rollover_cap": period.rollover_cap,
        },
        "period_start": rfc3339(pool.period_start_ms) if period else None,
        "period_end": rfc3339(pool.period_end_ms),
        "allocation": pool.allocation,
        "used": pool.used,
        "balance": pool.balance,
        "overage": pool.overage,
        "settled": pool.settled,
        "forfeited": pool.forfeited,
        "grants": [
            {
                "seq": g.seq, "kind": g.kind, "tokens": g.tokens, "remaining": g.remaining,
                "priority": g.priority, "expires_at": rfc3339(g.expires_ms),
                "created_at": rfc3339(g.created_ms),
            }
            for g in sorted(pool.grants, key=lambda g: g.burn_key)
        ],
        "thresholds": [format_share(t) for t in pool.thresholds],
        "fired": [format_share(t) for t in pool.fired],
        "topup": None if topup is None else {"floor": topup.floor, "tokens": topup.tokens},
        "topup_armed": pool.topup_armed,
        "devices": sorted(devices),
    }  # fmt: skip

"""Usage queries over real HTTP and the real CLI, against a gateway and a real Mosquitto:
filters by account, device and meter; hour, day, month and whole-span buckets; units and
tokens exact; CSV equal to JSON; and when usage counts as having happened (the device
clock when plausible, else the time of receipt)."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from fractions import Fraction
from math import ceil
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import PRICES, TOKEN, GatewayHandle, Listener, RawDevice, running_gateway

HOUR, DAY = 3_600_000, 86_400_000
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
BUCKETS = ("hour", "day", "month", "all")
ACCOUNTS = {"u-a1": "acme", "u-a2": "acme", "u-b1": "beta"}
Reports = list[tuple[str, int, dict[str, int]]]  # (device, device clock ms, counters)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def bucket_start(ms: int, bucket: str) -> str | None:
    """The RFC 3339 start of the UTC hour, day or month holding ``ms`` (None for all)."""
    if bucket == "all":
        return None
    moment = EPOCH + dt.timedelta(milliseconds=ms)
    moment = moment.replace(minute=0, second=0, microsecond=0)
    if bucket in ("day", "month"):
        moment = moment.replace(hour=0)
    if bucket == "month":
        moment = moment.replace(day=1)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def fleet_reports(anchor: int) -> Reports:
    """(device, device clock, cumulative counters), in publishing order. ``anchor`` is a
    whole UTC hour at least two hours ago, so every clock is plausible (past, < 30 days)."""
    t_old = anchor - 20 * DAY + HOUR // 2  # reported late, after an outage
    t1, t2, t3 = anchor + 300_000, anchor + 3_000_000, anchor + HOUR + 300_000
    return [
        ("u-a1", t_old, {"api_calls": 100}),
        ("u-a1", t1, {"api_calls": 1000, "gpu_seconds": 10}),
        ("u-a1", t2, {"api_calls": 3000, "gpu_seconds": 20}),
        ("u-a1", t3, {"api_calls": 3500, "gpu_seconds": 20}),
        ("u-a2", t2, {"api_calls": 700}),
        ("u-a2", t3, {"api_calls": 700, "bytes_out": 12_345}),
        ("u-b1", t1, {"api_calls": 50}),
        ("u-b1", t3, {"api_calls": 51, "gpu_seconds": 2}),  # 1 unit, 0 tokens: still a unit
    ]


def expected_rows(reports: Reports, bucket: str, **only: str) -> list[dict[str, Any]]:
    """The usage rows the charging rule gives: per (bucket, device, account, meter), the
    units advanced and ``ceil(c * price) - ceil(H * price)`` tokens, summed."""
    prices = {meter: Fraction(price) for meter, price in PRICES.items()}
    highs: dict[tuple[str, str], int] = defaultdict(int)
    sums: dict[tuple[str, str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    for device, t, counters in reports:
        for meter, count in counters.items():
            high = highs[device, meter]
            if count <= high:
                continue
            highs[device, meter] = count
            key = (bucket_start(t, bucket) or "", device, ACCOUNTS[device], meter)
            sums[key][0] += count - high
            sums[key][1] += ceil(count * prices[meter]) - ceil(high * prices[meter])
    rows = [
        {
            "bucket": b or None,
            "device": d,
            "account": a,
            "meter": m,
            "units": u,
            "tokens": t,
            "overage": 0,
        }
        for (b, d, a, m), (u, t) in sorted(sums.items())
    ]
    return [r for r in rows if all(r[k] == v for k, v in only.items())]


async def publish(
    gw: GatewayHandle, broker_url: str, reports: list[tuple[RawDevice, int, dict[str, int]]]
) -> None:
    """Publish each signed report in order and wait until the gateway processed them all."""
    before = gw.service.processed
    async with Listener.connect(broker_url) as publisher:
        for device, t, counters in reports:
            publisher.publish(gw.topics.usage(device.id), device.report(counters, t=t))
        await gw.wait_committed(lambda: gw.service.processed >= before + len(reports))


@pytest.fixture
async def gw(shared_broker: Any, tmp_path: Path) -> AsyncIterator[GatewayHandle]:
    async with running_gateway(shared_broker.url, tmp_path) as handle:
        yield handle


@pytest.fixture
async def fleet(gw: GatewayHandle, shared_broker: Any) -> Reports:
    """Three devices in two accounts have reported the usage of :func:`fleet_reports`."""
    now = now_ms()
    reports = fleet_reports(now - now % HOUR - 2 * HOUR)
    devices = {name: RawDevice(name) for name in ACCOUNTS}
    for name, device in devices.items():
        await gw.add_device(name, device.key, 1_000_000, account=ACCOUNTS[name])
    await publish(gw, shared_broker.url, [(devices[d], t, c) for d, t, c in reports])
    return reports


async def usage(gw: GatewayHandle, **params: str) -> Any:
    reply = await gw.api.get("/v1/usage", params=params)
    assert reply.status_code == 200, reply.text
    return reply.json()


def parse_csv(text: str) -> list[dict[str, Any]]:
    """CSV rows back into the JSON rows' shape (an empty bucket_start is bucket=all)."""
    lines = list(csv.DictReader(io.StringIO(text, newline="")))
    return [
        {"bucket": r["bucket_start"] or None, "device": r["device"], "account": r["account"],
         "meter": r["meter"], "units": int(r["units"]), "tokens": int(r["tokens"]),
         "overage": int(r["overage"])}
        for r in lines
    ]  # fmt: skip


@pytest.mark.parametrize("bucket", BUCKETS)
async def test_each_bucket_gives_exact_units_and_tokens(
    gw: GatewayHandle, fleet: Reports, bucket: str
) -> None:
    """Rows per UTC hour, day, month or the whole span equal the charging rule's debits,
    summed; total_tokens is their sum; the CSV parses back to the same rows."""
    reply = await usage(gw, bucket=bucket)
    assert reply["bucket"] == bucket
    assert reply["rows"] == expected_rows(fleet, bucket)
    assert reply["total_tokens"] == sum(r["tokens"] for r in reply["rows"])
    as_csv = await gw.api.get("/v1/usage", params={"bucket": bucket, "format": "csv"})
    assert as_csv.headers["content-type"] == "text/csv; charset=utf-8"
    assert parse_csv(as_csv.text) == reply["rows"]


async def test_hour_buckets_split_at_the_hour_and_keep_old_usage_apart(
    gw: GatewayHandle, fleet: Reports
) -> None:
    """Literal values: u-a1's api_calls per hour of its device clock (100 units 20 days
    ago; 900 + 2000 within one hour; 500 in the next)."""
    reply = await usage(gw, device="u-a1", meter="api_calls", bucket="hour")
    assert [(r["units"], r["tokens"]) for r in reply["rows"]] == [(100, 1), (2900, 29), (500, 5)]
    hours = sorted({bucket_start(t, "hour") or "" for device, t, _ in fleet if device == "u-a1"})
    assert [r["bucket"] for r in reply["rows"]] == hours
    whole = await usage(gw, device="u-b1")
    assert [(r["meter"], r["units"], r["tokens"]) for r in whole["rows"]] == [
        ("api_calls", 51, 1), ("gpu_seconds", 2, 1),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "only",
    [
        {"account": "acme"},
        {"account": "beta"},
        {"device": "u-a2"},
        {"meter": "api_calls"},
        {"account": "acme", "meter": "gpu_seconds"},
        {"device": "u-b1", "meter": "bytes_out"},  # nothing
        {"account": "nobody"},  # nothing
    ],
)
async def test_filters_by_account_device_and_meter(
    gw: GatewayHandle, fleet: Reports, only: dict[str, str]
) -> None:
    for bucket in ("hour", "all"):
        reply = await usage(gw, bucket=bucket, **only)
        assert reply["rows"] == expected_rows(fleet, bucket, **only)
        as_csv = await gw.api.get("/v1/usage", params={"bucket": bucket, "format": "csv", **only})
        assert parse_csv(as_csv.text) == reply["rows"]


async def test_csv_is_rfc_4180_with_a_header_and_no_totals(
    gw: GatewayHandle, fleet: Reports
) -> None:
    """CRLF line ends, one header row, one line a row, bucket_start empty for bucket=all."""
    text = (await gw.api.get("/v1/usage", params={"device": "u-b1", "format": "csv"})).text
    assert text == (
        "bucket_start,device,account,meter,units,tokens,overage\r\n"
        ",u-b1,beta,api_calls,51,1,0\r\n"
        ",u-b1,beta,gpu_seconds,2,1,0\r\n"
    )
    empty = await gw.api.get("/v1/usage", params={"device": "ghost", "format": "csv"})
    assert empty.text == "bucket_start,device,account,meter,units,tokens,overage\r\n"
    hourly = await gw.api.get(
        "/v1/usage", params={"device": "u-b1", "bucket": "hour", "format": "csv"}
    )
    first_report = next(t for device, t, _ in fleet if device == "u-b1")
    first = hourly.text.split("\r\n")[1]
    assert first == f"{bucket_start(first_report, 'hour')},u-b1,beta,api_calls,50,1,0"


async def test_a_bad_format_is_a_json_error(gw: GatewayHandle) -> None:
    reply = await gw.api.get("/v1/usage", params={"format": "xml"})
    assert reply.status_code == 422
    assert reply.json()["error"] == "invalid"
    assert "format" in reply.json()["detail"]


async def test_openapi_documents_json_and_csv_and_the_format_parameter(gw: GatewayHandle) -> None:
    spec = (await gw.api.get("/openapi.json")).json()
    operation = spec["paths"]["/v1/usage"]["get"]
    assert {"application/json", "text/csv"} <= set(operation["responses"]["200"]["content"])
    (param,) = [p for p in operation["parameters"] if p["name"] == "format"]
    assert param["in"] == "query"
    assert set(param["schema"]["enum"]) == {"json", "csv"}


# Attribution in time: the device clock when plausible (not more than 5 minutes ahead of
# receipt, not older than device_clock_max_age_s, 30 days by default), else receipt time.


async def test_usage_is_attributed_to_a_plausible_device_clock_else_to_receipt(
    gw: GatewayHandle, shared_broker: Any
) -> None:
    """Usage reported late (after an outage) lands at the device's own time, to the ms;
    a clock too old or too far ahead cannot move usage: it counts at receipt."""
    now = now_ms()
    clocks = {
        "late-3h": now - 3 * HOUR,  # plausible: device time
        "late-29d": now - 29 * DAY,  # plausible: device time, a different day
        "ahead-4m": now + 4 * 60_000,  # within 5 minutes ahead: device time
        "stale-31d": now - 31 * DAY,  # older than 30 days: receipt time
        "ahead-10m": now + 10 * 60_000,  # more than 5 minutes ahead: receipt time
    }
    devices = {name: RawDevice(name) for name in clocks}
    for name, device in devices.items():
        await gw.add_device(name, device.key, 1000)
    received_from = now_ms()
    await publish(
        gw, shared_broker.url, [(devices[n], t, {"api_calls": 700}) for n, t in clocks.items()]
    )
    received_by = now_ms()

    for name in ("late-3h", "late-29d", "ahead-4m"):
        at = clocks[name]
        exact = await usage(gw, device=name, since=str(at), until=str(at + 1))
        assert [(r["units"], r["tokens"]) for r in exact["rows"]] == [(700, 7)], name
        hourly = await usage(gw, device=name, bucket="hour")
        assert [r["bucket"] for r in hourly["rows"]] == [bucket_start(at, "hour")], name
    for name in ("stale-31d", "ahead-10m"):
        at = clocks[name]
        assert (await usage(gw, device=name, since=str(at), until=str(at + 1)))["rows"] == []
        window = {"since": str(received_from), "until": str(received_by + 1)}
        received = await usage(gw, device=name, **window)
        assert [(r["units"], r["tokens"]) for r in received["rows"]] == [(700, 7)], name
        hourly = (await usage(gw, device=name, bucket="hour"))["rows"]
        assert hourly[0]["bucket"] in {
            bucket_start(received_from, "hour"), bucket_start(received_by, "hour"),
        }  # fmt: skip


# The command line, as a real process. Output is compared as bytes: CSV lines end in CRLF.


def tokenwell(api: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "TOKENWELL_TOKEN": TOKEN, "TOKENWELL_API": api}
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args], env=env, capture_output=True, timeout=60,
        check=False,
    )  # fmt: skip


async def run_cli(api: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return await asyncio.to_thread(tokenwell, api, *args)


async def test_cli_csv_and_json_print_exactly_what_the_api_returns(
    gw: GatewayHandle, fleet: Reports
) -> None:
    api = str(gw.api.base_url)
    args = ["--account", "acme", "--meter", "api_calls", "--bucket", "hour"]
    params = {"account": "acme", "meter": "api_calls", "bucket": "hour"}
    for fmt in ("csv", "json"):
        result = await run_cli(api, "usage", *args, "--format", fmt)
        assert result.returncode == 0, result.stderr
        reply = await gw.api.get("/v1/usage", params={**params, "format": fmt})
        assert result.stdout == reply.content, fmt
    as_json = json.loads((await run_cli(api, "usage", *args, "--json")).stdout)
    as_csv = parse_csv((await run_cli(api, "usage", *args, "--format", "csv")).stdout.decode())
    assert (
        as_json["rows"] == as_csv == expected_rows(fleet, "hour", account="acme", meter="api_calls")
    )


async def test_cli_table_filters_by_device_and_meter(gw: GatewayHandle, fleet: Reports) -> None:
    result = await run_cli(
        str(gw.api.base_url), "usage", "--device", "u-a2", "--meter", "bytes_out"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0].split() == [
        "bucket",
        "device",
        "account",
        "meter",
        "units",
        "tokens",
        "overage",
    ]
    assert lines[2].split() == ["all", "u-a2", "acme", "bytes_out", "12345", "13", "0"]
    assert lines[-1] == "total tokens: 13 (overage 0)"


async def test_cli_wrong_arguments_are_one_line(gw: GatewayHandle) -> None:
    api = str(gw.api.base_url)
    for args in (["--format", "xml"], ["--bucket", "week"]):
        result = await run_cli(api, "usage", *args)
        assert result.returncode == 2, args
        assert result.stderr.count(b"\n") == 1, result.stderr
    refused = await run_cli(api, "usage", "--since", "yesterday", "--format", "csv")
    assert refused.returncode == 1
    assert refused.stderr.startswith(b"tokenwell: since:")
    assert refused.stderr.count(b"\n") == 1
    assert refused.stdout == b""
    helped = await run_cli(api, "usage", "--help")
    assert helped.returncode == 0
    for option in (b"--account", b"--device", b"--meter", b"--bucket", b"--format"):
        assert option in helped.stdout
